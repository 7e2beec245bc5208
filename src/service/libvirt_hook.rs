// SPDX-License-Identifier: Apache-2.0
//! `vhost-rng libvirt-hook`: libvirt's `qemu` hook (installed as
//! `/etc/libvirt/hooks/qemu.d/vhost-rng`). libvirt runs it with the domain's
//! name and the operation as arguments and the domain XML on standard input;
//! on `prepare` it adds the domain's guest to the running daemon, on
//! `release` it removes it, so VMs defined in libvirt get their entropy
//! without any other configuration.
//!
//! What makes a domain's guest, read from its XML:
//!
//! - `<rng><backend model='random'>PATH</backend></rng>` where PATH is not a
//!   character device (not `/dev/urandom`): a `fifo=PATH` guest;
//! - `<rng><backend model='egd' type='unix'><source path='PATH'/>`: an
//!   `egd=PATH` guest;
//! - a `vhost-user-rng-pci` device in `<qemu:commandline>`, with the
//!   `-chardev socket,...,path=PATH` it names: a `socket=PATH` guest;
//!
//! each with the `<rate bytes='N' period='MS'/>` of its `<rng>` as
//! `rate-bytes`/`rate-period` (the same units). A path some guest already
//! serves (a FIFO shared by every VM, as Nova's `rng_dev_path` is) is left to
//! that guest. The guest is named after the domain (or `vm-UUID` when the
//! name is not a valid guest name). A failure on `prepare` exits 1 with the
//! reason, which libvirt shows and which stops the domain from starting
//! without its device; `release` never fails.

use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::config::validate_name;
use crate::service::control::{self, Request, Response};

/// libvirt's namespace for `<qemu:commandline>`.
const QEMU_NAMESPACE: &str = "http://libvirt.org/schemas/domain/qemu/1.0";
/// The most of the domain XML read from standard input.
const MAX_XML: u64 = 4 << 20;

/// Why the hook could not do its part.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The domain XML on standard input could not be read or parsed.
    #[error("cannot read the domain XML: {0}")]
    Xml(String),
    /// The domain has neither a usable name nor a UUID.
    #[error("the domain has no name usable as a guest name and no UUID")]
    NoName,
    /// The daemon refused or could not be reached.
    #[error("vhost-rng: {0}")]
    Daemon(#[from] control::ControlError),
}

/// One guest a domain needs: its endpoint key and path, and its rate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainGuest {
    /// `fifo`, `egd` or `socket`.
    pub key: &'static str,
    /// The endpoint's path.
    pub path: PathBuf,
    /// `<rate bytes=... period=...>`: bytes and milliseconds.
    pub rate: Option<(u64, Option<u64>)>,
}

/// What the XML says: the guest name to use and the guests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    /// The guest name for the domain.
    pub name: String,
    /// The endpoints the domain's RNG devices use.
    pub guests: Vec<DomainGuest>,
}

/// Reads `xml` (a libvirt domain definition). `is_char_device` says whether
/// a path is a character device (a `random` backend reading one is not
/// ours).
pub fn parse_domain(
    xml: &str,
    is_char_device: impl Fn(&Path) -> bool,
) -> Result<Domain, HookError> {
    let document = roxmltree::Document::parse(xml).map_err(|e| HookError::Xml(e.to_string()))?;
    let root = document.root_element();
    let child_text = |name: &str| {
        root.children()
            .find(|n| n.has_tag_name(name))
            .and_then(|n| n.text())
            .map(str::trim)
            .filter(|t| !t.is_empty())
    };
    let name = match child_text("name") {
        Some(name) if validate_name(name).is_ok() => name.to_owned(),
        _ => {
            let uuid = child_text("uuid").ok_or(HookError::NoName)?;
            let name = format!("vm-{uuid}");
            validate_name(&name).map_err(|_| HookError::NoName)?;
            name
        }
    };
    let mut guests = Vec::new();
    for rng in root
        .descendants()
        .filter(|n| n.has_tag_name("rng") && n.parent().is_some_and(|p| p.has_tag_name("devices")))
    {
        let rate = rng
            .children()
            .find(|n| n.has_tag_name("rate"))
            .and_then(|rate| {
                let bytes = rate.attribute("bytes")?.parse().ok()?;
                let period = rate.attribute("period").and_then(|p| p.parse().ok());
                Some((bytes, period))
            });
        let Some(backend) = rng.children().find(|n| n.has_tag_name("backend")) else {
            continue;
        };
        let found = match backend.attribute("model") {
            Some("random") => backend
                .text()
                .map(str::trim)
                .map(PathBuf::from)
                .filter(|path| !path.as_os_str().is_empty() && !is_char_device(path))
                .map(|path| ("fifo", path)),
            Some("egd") if backend.attribute("type") == Some("unix") => backend
                .children()
                .find(|n| n.has_tag_name("source"))
                .and_then(|source| source.attribute("path"))
                .map(|path| ("egd", PathBuf::from(path))),
            _ => None,
        };
        if let Some((key, path)) = found {
            guests.push(DomainGuest { key, path, rate });
        }
    }
    guests.extend(
        vhost_user_sockets(&root)
            .into_iter()
            .map(|path| DomainGuest {
                key: "socket",
                path,
                rate: None,
            }),
    );
    Ok(Domain { name, guests })
}

/// The socket paths of the `vhost-user-rng-pci` devices passed through
/// `<qemu:commandline>`.
fn vhost_user_sockets(root: &roxmltree::Node<'_, '_>) -> Vec<PathBuf> {
    let args: Vec<&str> = root
        .descendants()
        .filter(|n| {
            n.tag_name().name() == "arg" && n.tag_name().namespace() == Some(QEMU_NAMESPACE)
        })
        .filter_map(|n| n.attribute("value"))
        .collect();
    // `-chardev socket,id=ID,path=PATH` and `-device vhost-user-rng-pci,chardev=ID`.
    let options = |value: &str| -> Vec<(String, String)> {
        value
            .split(',')
            .filter_map(|part| part.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    };
    let after = |flag: &str| {
        args.windows(2)
            .filter(move |pair| pair[0] == flag)
            .map(|pair| pair[1])
            .collect::<Vec<_>>()
    };
    let chardevs: Vec<(String, String)> = after("-chardev")
        .into_iter()
        .filter(|value| value.starts_with("socket,"))
        .filter_map(|value| {
            let options = options(value);
            let get = |key: &str| {
                options
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.clone())
            };
            Some((get("id")?, get("path")?))
        })
        .collect();
    after("-device")
        .into_iter()
        .filter(|value| value.starts_with("vhost-user-rng"))
        .filter_map(|value| {
            let id = options(value)
                .into_iter()
                .find(|(k, _)| k == "chardev")
                .map(|(_, v)| v)?;
            chardevs
                .iter()
                .find(|(chardev, _)| *chardev == id)
                .map(|(_, path)| PathBuf::from(path))
        })
        .collect()
}

impl Domain {
    /// The guest specs to add (`--guest` form), one per endpoint, the first
    /// named after the domain and the others `NAME-2`, `NAME-3`, ...
    pub fn specs(&self) -> Vec<(String, String)> {
        self.guests
            .iter()
            .enumerate()
            .map(|(i, guest)| {
                let name = self.guest_name(i);
                let mut spec = format!("name={name},{}={}", guest.key, guest.path.display());
                if let Some((bytes, period)) = guest.rate {
                    spec.push_str(&format!(",rate-bytes={bytes}"));
                    if let Some(period) = period {
                        spec.push_str(&format!(",rate-period={period}"));
                    }
                }
                (name, spec)
            })
            .collect()
    }

    fn guest_name(&self, index: usize) -> String {
        if index == 0 {
            self.name.clone()
        } else {
            format!("{}-{}", self.name, index + 1)
        }
    }
}

/// Runs the hook for `operation` of the domain whose XML is on standard
/// input, against the daemon at `control`.
pub fn run(control: &Path, operation: &str) -> ExitCode {
    match hook(control, operation, std::io::stdin().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn hook(control: &Path, operation: &str, input: impl Read) -> Result<(), HookError> {
    if operation != "prepare" && operation != "release" {
        return Ok(());
    }
    let mut xml = String::new();
    input
        .take(MAX_XML)
        .read_to_string(&mut xml)
        .map_err(|e| HookError::Xml(e.to_string()))?;
    let domain = parse_domain(&xml, |path| {
        std::fs::metadata(path).is_ok_and(|m| m.file_type().is_char_device())
    })?;
    if domain.guests.is_empty() {
        return Ok(());
    }
    let guests = match control::request(control, &Request::GuestList) {
        Ok(Response::Guests { guests }) => guests,
        Ok(_) => Vec::new(),
        // Nothing to remove from a daemon that is not running.
        Err(_) if operation == "release" => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for (i, (name, spec)) in domain.specs().into_iter().enumerate() {
        let path = domain.guests[i].path.to_string_lossy().into_owned();
        let ours = guests.iter().any(|g| g.name == name);
        match operation {
            "prepare" => {
                // Served already: a shared FIFO, a configured guest, or
                // this domain's guest from an earlier start.
                if ours || guests.iter().any(|g| g.path == path) {
                    continue;
                }
                match control::request(control, &Request::GuestAdd { spec }) {
                    Ok(Response::Error { message }) => {
                        return Err(control::ControlError::Refused(message).into());
                    }
                    Ok(_) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            _ => {
                if ours {
                    let _ = control::request(control, &Request::GuestRemove { name });
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOVA: &str = r#"<domain type='qemu'>
  <name>instance-0000002a</name>
  <uuid>9f1c4a52-2d0e-4c5e-8a55-0d1f2e3c4b5a</uuid>
  <devices>
    <rng model='virtio'>
      <rate period='1000' bytes='2048'/>
      <backend model='random'>/run/vhost-rng/nova.fifo</backend>
      <alias name='rng0'/>
    </rng>
  </devices>
</domain>"#;

    #[test]
    fn a_random_backend_on_a_path_is_a_fifo_guest_with_its_rate() {
        let domain = parse_domain(NOVA, |_| false).unwrap();
        assert_eq!(domain.name, "instance-0000002a");
        assert_eq!(
            domain.specs(),
            [(
                "instance-0000002a".to_owned(),
                "name=instance-0000002a,fifo=/run/vhost-rng/nova.fifo,rate-bytes=2048,rate-period=1000"
                    .to_owned()
            )]
        );
        // /dev/urandom and the like are not ours.
        assert!(parse_domain(NOVA, |_| true).unwrap().guests.is_empty());
    }

    #[test]
    fn egd_and_vhost_user_devices_are_found_and_others_ignored() {
        let xml = r#"<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web 1</name>
  <uuid>11111111-2222-3333-4444-555555555555</uuid>
  <devices>
    <rng model='virtio'>
      <backend model='egd' type='unix'><source mode='connect' path='/run/vhost-rng/web.egd'/></backend>
    </rng>
    <rng model='virtio'><backend model='builtin'/></rng>
    <disk type='file'><source file='/x'/></disk>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-chardev'/>
    <qemu:arg value='socket,id=vrng0,path=/run/vhost-rng/web.sock'/>
    <qemu:arg value='-chardev'/>
    <qemu:arg value='socket,id=other,path=/run/other.sock'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='vhost-user-rng-pci,chardev=vrng0'/>
  </qemu:commandline>
</domain>"#;
        let domain = parse_domain(xml, |_| false).unwrap();
        // "web 1" is no guest name: the UUID names it.
        assert_eq!(domain.name, "vm-11111111-2222-3333-4444-555555555555");
        let specs: Vec<String> = domain.specs().into_iter().map(|(_, s)| s).collect();
        assert_eq!(
            specs,
            [
                "name=vm-11111111-2222-3333-4444-555555555555,egd=/run/vhost-rng/web.egd",
                "name=vm-11111111-2222-3333-4444-555555555555-2,socket=/run/vhost-rng/web.sock",
            ]
        );
    }

    #[test]
    fn bad_xml_and_nameless_domains_are_errors() {
        assert!(matches!(
            parse_domain("<domain", |_| false),
            Err(HookError::Xml(_))
        ));
        assert!(matches!(
            parse_domain("<domain><name>a b</name></domain>", |_| false),
            Err(HookError::NoName)
        ));
        let none = parse_domain("<domain><name>vm</name><devices/></domain>", |_| false).unwrap();
        assert!(none.guests.is_empty());
    }

    #[test]
    fn other_operations_and_domains_without_a_device_never_reach_the_daemon() {
        let missing = Path::new("/nonexistent/control.sock");
        assert!(hook(missing, "started", NOVA.as_bytes()).is_ok());
        let plain = "<domain><name>vm</name><devices/></domain>";
        assert!(hook(missing, "prepare", plain.as_bytes()).is_ok());
        // A device but no daemon: the domain must not start without it.
        assert!(matches!(
            hook(missing, "prepare", NOVA.as_bytes()),
            Err(HookError::Daemon(_))
        ));
        assert!(hook(missing, "release", NOVA.as_bytes()).is_ok());
    }
}
