// SPDX-License-Identifier: Apache-2.0
//! Turns each vhost-user message into a call on the connection's
//! [`Handler`], checking what the framing cannot: payload sizes, which
//! messages may carry file descriptors and how many, and which need the
//! protocol features the VMM acknowledged. Replies, and acknowledgements
//! when REPLY_ACK was negotiated and the VMM asked for one, go out here.

use std::fs::File;

use vhost::vhost_user::VhostUserBackendReqHandlerMut;
use vhost::vhost_user::message::{
    VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserSingleMemoryRegion,
    VhostUserVringAddrFlags,
};

use super::connection::{Message, NEED_REPLY, Payload, reply_bytes};
use super::handler::Handler;

// Request codes (vhost-user.rst, "Front-end message types").
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const RESET_OWNER: u32 = 4;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const SET_VRING_ERR: u32 = 14;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_QUEUE_NUM: u32 = 17;
const SET_VRING_ENABLE: u32 = 18;
const GET_MAX_MEM_SLOTS: u32 = 36;
const ADD_MEM_REG: u32 = 37;
pub(super) const REM_MEM_REG: u32 = 38;

/// A vring fd message without an fd (polling mode) sets this bit.
const VRING_NO_FD: u64 = 0x100;
/// One memory region: guest address, size, VMM address, file offset.
const REGION_LEN: usize = 32;

/// Whether a message with `code` and `payload` carries descriptors: the
/// memory messages, and the vring fd messages unless they say "no fd"
/// (polling mode). REM_MEM_REG may carry one or none.
pub fn expects_fds(code: u32, payload: &[u8]) -> bool {
    match code {
        SET_MEM_TABLE | ADD_MEM_REG | REM_MEM_REG => true,
        SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR => {
            Payload::exact(payload, 8).is_ok_and(|mut value| value.u64() & VRING_NO_FD == 0)
        }
        _ => false,
    }
}

/// What handling a message came to.
#[derive(Debug)]
pub struct Handled {
    /// The request code.
    pub code: u32,
    /// The reply to send, as it goes on the socket, if the message gets one.
    pub reply: Option<Vec<u8>>,
}

/// Handles `message`; the reply is for the caller to send (after recording
/// the effect: see `connection::consume`). `Err` says why the connection
/// must close.
pub fn dispatch(handler: &mut Handler, message: Message) -> Result<Handled, String> {
    let Message {
        code,
        flags,
        payload,
        fds,
        raw: _,
    } = message;
    let mut files: Vec<File> = fds.into_iter().map(File::from).collect();
    let takes_fds = matches!(
        code,
        SET_MEM_TABLE | ADD_MEM_REG | REM_MEM_REG | SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR
    );
    if !takes_fds && !files.is_empty() {
        return Err(format!(
            "{} file descriptor(s) on request {code}, which takes none",
            files.len()
        ));
    }
    let size = |expected| Payload::exact(&payload, expected).map_err(|e| e.to_string());
    let refused =
        |handler: &mut Handler, error: vhost::vhost_user::Error| match handler.take_fatal() {
            Some(refusal) => format!("the VMM sent {refusal}"),
            None => format!("request {code} failed: {error}"),
        };
    let needs_mem_slots = |handler: &Handler| {
        if handler.acked_protocol(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
            Ok(())
        } else {
            Err(format!(
                "request {code} without the CONFIGURE_MEM_SLOTS protocol feature"
            ))
        }
    };

    // Requests with a reply of their own.
    let answer: Option<Vec<u8>> = match code {
        GET_FEATURES => {
            size(0)?;
            let features = handler.get_features().map_err(|e| refused(handler, e))?;
            Some(features.to_le_bytes().to_vec())
        }
        GET_PROTOCOL_FEATURES => {
            size(0)?;
            let features = handler
                .get_protocol_features()
                .map_err(|e| refused(handler, e))?;
            Some(features.bits().to_le_bytes().to_vec())
        }
        GET_QUEUE_NUM => {
            size(0)?;
            let queues = handler.get_queue_num().map_err(|e| refused(handler, e))?;
            Some(queues.to_le_bytes().to_vec())
        }
        GET_MAX_MEM_SLOTS => {
            size(0)?;
            needs_mem_slots(handler)?;
            let slots = handler
                .get_max_mem_slots()
                .map_err(|e| refused(handler, e))?;
            Some(slots.to_le_bytes().to_vec())
        }
        GET_VRING_BASE => {
            let mut state = size(8)?;
            let (index, _) = (state.u32(), state.u32());
            let base = handler
                .get_vring_base(index)
                .map_err(|e| refused(handler, e))?;
            let mut bytes = base.index.to_le_bytes().to_vec();
            bytes.extend_from_slice(&base.num.to_le_bytes());
            Some(bytes)
        }
        _ => None,
    };
    if let Some(answer) = answer {
        return Ok(Handled {
            code,
            reply: Some(reply_bytes(code, &answer)),
        });
    }

    let result = match code {
        SET_FEATURES => {
            let features = size(8)?.u64();
            handler.set_features(features)
        }
        SET_PROTOCOL_FEATURES => {
            let features = size(8)?.u64();
            handler.set_protocol_features(features)
        }
        SET_OWNER => {
            size(0)?;
            handler.set_owner()
        }
        RESET_OWNER => {
            size(0)?;
            handler.reset_owner()
        }
        SET_MEM_TABLE => {
            let count = payload.len().saturating_sub(8) / REGION_LEN;
            let mut table = size(8 + count * REGION_LEN)?;
            let (declared, _padding) = (table.u32() as usize, table.u32());
            if declared != count || files.len() != count {
                return Err(format!(
                    "a memory table of {declared} region(s) with {count} described and {} \
                     file descriptor(s)",
                    files.len()
                ));
            }
            let regions: Vec<VhostUserMemoryRegion> =
                (0..count).map(|_| region(&mut table)).collect();
            handler.set_mem_table(&regions, files, None).map(|_| ())
        }
        ADD_MEM_REG => {
            needs_mem_slots(handler)?;
            let mut single = size(8 + REGION_LEN)?;
            let _padding = single.u64();
            let region = region(&mut single);
            let file = exactly_one(&mut files, code)?;
            let single = VhostUserSingleMemoryRegion::new(
                region.guest_phys_addr,
                region.memory_size,
                region.user_addr,
                region.mmap_offset,
            );
            handler.add_mem_region(&single, file, None).map(|_| ())
        }
        REM_MEM_REG => {
            needs_mem_slots(handler)?;
            let mut single = size(8 + REGION_LEN)?;
            let _padding = single.u64();
            let region = region(&mut single);
            // The spec lets old frontends attach an fd here; it is closed
            // unused when `files` drops.
            let single = VhostUserSingleMemoryRegion::new(
                region.guest_phys_addr,
                region.memory_size,
                region.user_addr,
                region.mmap_offset,
            );
            handler.remove_mem_region(&single)
        }
        SET_VRING_NUM | SET_VRING_BASE | SET_VRING_ENABLE => {
            let mut state = size(8)?;
            let (index, num) = (state.u32(), state.u32());
            match code {
                SET_VRING_NUM => handler.set_vring_num(index, num),
                SET_VRING_BASE => handler.set_vring_base(index, num),
                _ => handler.set_vring_enable(index, num != 0),
            }
        }
        SET_VRING_ADDR => {
            let mut addr = size(40)?;
            let (index, flags) = (addr.u32(), addr.u32());
            let (descriptor, used, available, log) =
                (addr.u64(), addr.u64(), addr.u64(), addr.u64());
            let Some(flags) = VhostUserVringAddrFlags::from_bits(flags) else {
                return Err(format!("vring address flags {flags:#x}"));
            };
            handler.set_vring_addr(index, flags, descriptor, used, available, log)
        }
        SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR => {
            let value = size(8)?.u64();
            let file = if value & VRING_NO_FD != 0 {
                if !files.is_empty() {
                    return Err(format!("request {code} says no fd but carries one"));
                }
                None
            } else {
                Some(exactly_one(&mut files, code)?)
            };
            // Bits 0-7 are the queue index.
            let index = (value & 0xff) as u8;
            if value & !(0xff | VRING_NO_FD) != 0 {
                return Err(format!("request {code} with value {value:#x}"));
            }
            match code {
                SET_VRING_KICK => handler.set_vring_kick(index, file),
                SET_VRING_CALL => handler.set_vring_call(index, file),
                _ => handler.set_vring_err(index, file),
            }
        }
        _ => {
            return Err(format!(
                "request {code}, which this device does not support"
            ));
        }
    };
    result.map_err(|e| refused(handler, e))?;
    if let Some(refusal) = handler.take_fatal() {
        return Err(format!("the VMM sent {refusal}"));
    }
    // Asked after the message, so that the SET_PROTOCOL_FEATURES that
    // turns REPLY_ACK on is acknowledged too, as the vhost crate does.
    let reply = (flags & NEED_REPLY != 0 && handler.reply_ack())
        .then(|| reply_bytes(code, &0u64.to_le_bytes()));
    Ok(Handled { code, reply })
}

fn region(payload: &mut Payload<'_>) -> VhostUserMemoryRegion {
    let (gpa, size, vmm, offset) = (payload.u64(), payload.u64(), payload.u64(), payload.u64());
    VhostUserMemoryRegion::new(gpa, size, vmm, offset)
}

fn exactly_one(files: &mut Vec<File>, code: u32) -> Result<File, String> {
    if files.len() == 1 {
        files
            .pop()
            .ok_or_else(|| format!("request {code} without its fd"))
    } else {
        Err(format!(
            "request {code} with {} file descriptors (one belongs)",
            files.len()
        ))
    }
}
