// SPDX-License-Identifier: Apache-2.0
//! Real libvirt (libvirtd 9.0 on Debian 12, started by tests/run-all.sh,
//! QEMU under TCG running as `libvirt-qemu`) booting the test guest from
//! libvirt's own domain XML against the daemon: `<backend model='random'>` on
//! a `fifo=` guest, `<backend model='egd'>`, vhost-user through
//! `<qemu:commandline>` with a shared memfd `<memoryBacking>`, the domain
//! XML OpenStack Nova writes for a flavor with `hw_rng:*` (two instances on
//! one shared FIFO), and the `libvirt-hook` adding and removing a domain's
//! guest. Each checks the bytes the guest read and the daemon's counters.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Daemon, sha256_prefix, test_guest};

const BYTES: usize = 64 * 1024;
/// The control socket the test hook (installed by tests/run-all.sh as
/// /etc/libvirt/hooks/qemu.d/vhost-rng-test) talks to, for domains named
/// `hooked-*` only.
const HOOK_CONTROL: &str = "/run/vhost-rng-test/control.sock";

fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .output()
        .expect("virsh (libvirt-clients) must be installed")
}

/// A directory QEMU (as libvirt-qemu) can reach, with the test guest in it.
fn guest_dir() -> Option<tempfile::TempDir> {
    let guest = test_guest()?;
    let up = virsh(&["version"]);
    assert!(
        up.status.success(),
        "libvirtd must run (tests/run-all.sh starts it): {up:?}"
    );
    let dir = tempfile::Builder::new()
        .prefix("vrng-libvirt")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for file in ["bzImage", "initramfs.cpio.gz"] {
        std::fs::copy(guest.join(file), dir.path().join(file)).unwrap();
    }
    Some(dir)
}

/// A libvirt domain that boots the test guest, reads `BYTES` from its
/// virtio-rng and writes them to a disk; `devices` and `extra` are spliced
/// into `<devices>` and the domain.
fn domain_xml(dir: &Path, name: &str, devices: &str, extra: &str) -> String {
    let d = dir.display();
    format!(
        r#"<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{d}/bzImage</kernel>
    <initrd>{d}/initramfs.cpio.gz</initrd>
    <cmdline>console=ttyS0 quiet loglevel=3 panic=-1 vrng.bytes={BYTES} vrng.out=/dev/vda</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  {extra}
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{d}/{name}.img'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='{d}/{name}.console'/>
      <target port='0'/>
    </serial>
    {devices}
    <memballoon model='none'/>
  </devices>
</domain>"#
    )
}

/// A running domain; destroyed when dropped.
struct Domain {
    name: String,
    console: PathBuf,
    disk: PathBuf,
}

impl Domain {
    fn start(dir: &Path, name: &str, devices: &str, extra: &str) -> Domain {
        let disk = dir.join(format!("{name}.img"));
        std::fs::write(&disk, vec![0u8; BYTES.div_ceil(512) * 512]).unwrap();
        let xml = dir.join(format!("{name}.xml"));
        std::fs::write(&xml, domain_xml(dir, name, devices, extra)).unwrap();
        let created = virsh(&["create", xml.to_str().unwrap()]);
        assert!(created.status.success(), "virsh create {name}: {created:?}");
        Domain {
            name: name.to_owned(),
            console: dir.join(format!("{name}.console")),
            disk,
        }
    }

    /// Waits for the guest's report; asserts it read every byte and wrote
    /// what it read to its disk.
    fn assert_read_all(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let console = loop {
            let console = std::fs::read_to_string(&self.console).unwrap_or_default();
            if console.contains("VRNG done") {
                break console;
            }
            assert!(
                Instant::now() < deadline,
                "{}: no report in time:\n{console}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(
            console.contains("VRNG done status=ok"),
            "{}: {console}",
            self.name
        );
        assert!(
            console.contains(&format!("VRNG read_bytes={BYTES} ")),
            "{}: {console}",
            self.name
        );
        let sha = console
            .lines()
            .find_map(|l| l.strip_prefix("VRNG sha256="))
            .unwrap()
            .trim();
        assert_eq!(sha256_prefix(&self.disk, BYTES), sha, "{}", self.name);
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
    }
}

fn serve(dir: &Path, guests: &[String], control: Option<&str>) -> Daemon {
    let mut args = vec![
        "serve".to_owned(),
        "--source".into(),
        "os".into(),
        "--socket-group".into(),
        "libvirt-qemu".into(),
        "--socket-mode".into(),
        "0660".into(),
        "--socket-dir".into(),
        dir.display().to_string(),
    ];
    for guest in guests {
        args.push("--guest".into());
        args.push(guest.clone());
    }
    if let Some(control) = control {
        args.push("--control".into());
        args.push(control.into());
    }
    let mut daemon = Daemon::start(args);
    daemon.wait_for_log_while_running("serving process ready", 1);
    daemon
}

#[test]
fn libvirt_random_backend_reads_a_fifo_guest() {
    let Some(dir) = guest_dir() else { return };
    let fifo = dir.path().join("vm.fifo");
    let daemon = serve(
        dir.path(),
        &[format!("name=vm,fifo={}", fifo.display())],
        None,
    );
    let devices = format!(
        "<rng model='virtio'><backend model='random'>{}</backend></rng>",
        fifo.display()
    );
    let domain = Domain::start(dir.path(), "vrng-fifo", &devices, "");
    domain.assert_read_all();
    assert!(daemon.guest("vm").bytes >= BYTES as u64);
}

#[test]
fn libvirt_egd_backend_reads_an_egd_guest() {
    let Some(dir) = guest_dir() else { return };
    let egd = dir.path().join("vm.egd");
    let daemon = serve(
        dir.path(),
        &[format!("name=vm,egd={}", egd.display())],
        None,
    );
    let devices = format!(
        "<rng model='virtio'><backend model='egd' type='unix'>\
         <source mode='connect' path='{}'/></backend></rng>",
        egd.display()
    );
    let domain = Domain::start(dir.path(), "vrng-egd", &devices, "");
    domain.assert_read_all();
    let status = daemon.guest("vm");
    assert!(status.bytes >= BYTES as u64, "{status:?}");
    assert_eq!(status.connections, 1, "{status:?}");
}

#[test]
fn libvirt_qemu_commandline_vhost_user_with_shared_memfd_memory() {
    let Some(dir) = guest_dir() else { return };
    let socket = dir.path().join("vm.sock");
    let daemon = serve(
        dir.path(),
        &[format!("name=vm,socket={}", socket.display())],
        None,
    );
    let extra = format!(
        "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>\n  \
         <qemu:commandline>\
         <qemu:arg value='-chardev'/><qemu:arg value='socket,id=vrng0,path={}'/>\
         <qemu:arg value='-device'/><qemu:arg value='vhost-user-rng-pci,chardev=vrng0,bus=pci.0,addr=0x9'/>\
         </qemu:commandline>",
        socket.display()
    );
    let domain = Domain::start(dir.path(), "vrng-vhost-user", "", &extra);
    domain.assert_read_all();
    let status = daemon.guest("vm");
    assert!(status.bytes >= BYTES as u64, "{status:?}");
    assert!(daemon.log().contains("guest vm: VMM connected on"));
}

/// The domain XML Nova's libvirt driver writes for an instance of a flavor
/// with `hw_rng:allowed=True`, `hw_rng:rate_bytes=2048`,
/// `hw_rng:rate_period=1000` and an image with `hw_rng_model=virtio`,
/// `[libvirt] rng_dev_path` pointing at the daemon's shared FIFO: two
/// instances read it at once, one guest serves both.
#[test]
fn two_nova_instances_share_one_fifo_guest() {
    let Some(dir) = guest_dir() else { return };
    let fifo = dir.path().join("nova.fifo");
    let daemon = serve(
        dir.path(),
        &[format!("name=nova,fifo={}", fifo.display())],
        None,
    );
    let nova_rng = |alias: &str| {
        format!(
            "<rng model='virtio'>\n      <rate period='1000' bytes='2048'/>\n      \
             <backend model='random'>{}</backend>\n      <alias name='{alias}'/>\n    </rng>",
            fifo.display()
        )
    };
    // 64 KiB at 2 KiB/s would take half a minute: QEMU enforces <rate>, so
    // these instances read with a flavor rate that lets the test finish.
    let fast = |xml: String| xml.replace("bytes='2048'", "bytes='1048576'");
    let first = Domain::start(
        dir.path(),
        "instance-00000001",
        &fast(nova_rng("rng0")),
        "<uuid>0b0a61f6-59a2-4a4d-9a4e-6e0c0d7a0001</uuid>",
    );
    let second = Domain::start(
        dir.path(),
        "instance-00000002",
        &fast(nova_rng("rng0")),
        "<uuid>0b0a61f6-59a2-4a4d-9a4e-6e0c0d7a0002</uuid>",
    );
    first.assert_read_all();
    second.assert_read_all();
    assert!(daemon.guest("nova").bytes >= 2 * BYTES as u64);
    assert_eq!(daemon.guests().len(), 1, "one guest for every instance");
}

/// The hook libvirt runs: `prepare` adds the domain's guest (its FIFO made
/// by the daemon, with the domain's `<rate>`), `release` removes it and its
/// FIFO.
#[test]
fn the_libvirt_hook_adds_and_removes_a_domains_guest() {
    let Some(dir) = guest_dir() else { return };
    std::fs::create_dir_all(Path::new(HOOK_CONTROL).parent().unwrap()).unwrap();
    let daemon = serve(dir.path(), &[], Some(HOOK_CONTROL));
    let fifo = dir.path().join("hooked.fifo");
    let devices = format!(
        "<rng model='virtio'><rate bytes='1048576' period='500'/>\
         <backend model='random'>{}</backend></rng>",
        fifo.display()
    );
    let name = "hooked-vm";
    let guests = || common::guests_at(Path::new(HOOK_CONTROL)).unwrap_or_else(|e| panic!("{e}"));
    let domain = Domain::start(dir.path(), name, &devices, "");
    let guest = guests().into_iter().find(|g| g.name == name).unwrap();
    assert_eq!(guest.rate_bytes, Some(1048576), "{guest:?}");
    assert_eq!(guest.rate_period_ms, Some(500), "{guest:?}");
    domain.assert_read_all();
    let served = guests().into_iter().find(|g| g.name == name).unwrap().bytes;
    assert!(served >= BYTES as u64, "{served}");
    drop(domain);
    common::wait_until("the hook to remove the guest", || {
        guests().iter().all(|g| g.name != name)
    });
    drop(daemon);
    assert!(!fifo.exists(), "the guest's FIFO went with it");
}
