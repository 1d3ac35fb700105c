//! The vhost-user control plane under the fuzzer: message sequences from
//! its input, sent to a device over a real socket.

use std::io;
use std::time::Duration;

use super::input::Input;
use super::null_export;
use crate::export::ExportOptions;

/// Request codes the vhost-user fuzz target sends (vhost-user.rst).
mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
    pub const ADD_MEM_REG: u32 = 37;
    pub const REM_MEM_REG: u32 = 38;
    pub const RESET_DEVICE: u32 = 34;
}

/// The order a real frontend sets a device up in, which the fuzzer starts
/// from more often than not, so that later messages reach live rings.
const SETUP: [u32; 11] = [
    req::SET_OWNER,
    req::GET_FEATURES,
    req::SET_FEATURES,
    req::SET_PROTOCOL_FEATURES,
    req::SET_MEM_TABLE,
    req::SET_VRING_NUM,
    req::SET_VRING_ADDR,
    req::SET_VRING_BASE,
    req::SET_VRING_CALL,
    req::SET_VRING_KICK,
    req::SET_VRING_ENABLE,
];

const ANY: [u32; 22] = [
    req::RESET_DEVICE,
    req::GET_FEATURES,
    req::SET_FEATURES,
    req::SET_OWNER,
    req::RESET_OWNER,
    req::SET_MEM_TABLE,
    req::SET_VRING_NUM,
    req::SET_VRING_ADDR,
    req::SET_VRING_BASE,
    req::GET_VRING_BASE,
    req::SET_VRING_KICK,
    req::SET_VRING_CALL,
    req::SET_VRING_ERR,
    req::GET_PROTOCOL_FEATURES,
    req::SET_PROTOCOL_FEATURES,
    req::GET_QUEUE_NUM,
    req::SET_VRING_ENABLE,
    req::GET_CONFIG,
    req::SET_CONFIG,
    req::GET_MAX_MEM_SLOTS,
    req::ADD_MEM_REG,
    req::REM_MEM_REG,
];

/// Guest memory the fuzzer hands the device: one memfd per region, the
/// same bytes each time, so a ring can be found in it.
fn memfd(input: &mut Input<'_>, len: u64) -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a static NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"strata-fuzz".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor we own.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(len).expect("memfd size");
    let fill: Vec<u8> = (0..len.min(1 << 16)).map(|_| input.byte()).collect();
    std::os::unix::fs::FileExt::write_all_at(&f, &fill, 0).expect("memfd fill");
    f
}

/// One message of the vhost-user fuzz target: the header, the payload and
/// the descriptors it carries.
fn message(input: &mut Input<'_>, code: u32, files: &mut Vec<std::fs::File>) -> Vec<u8> {
    use vmm_sys_util::eventfd::EventFd;
    let mut body = Vec::new();
    let u32le = |b: &mut Vec<u8>, v: u32| b.extend_from_slice(&v.to_le_bytes());
    let u64le = |b: &mut Vec<u8>, v: u64| b.extend_from_slice(&v.to_le_bytes());
    let queue = u32::from(input.byte() % 3);
    let region = |input: &mut Input<'_>, body: &mut Vec<u8>, files: &mut Vec<std::fs::File>| {
        let pages = 1 + u64::from(input.byte() % 16);
        // Mostly at 0, where the rings are looked for.
        let gpa = match input.byte() % 4 {
            0 => u64::from(input.u16()) << 12,
            k => u64::from(k - 1) << 16,
        };
        u64le(body, gpa); // guest_phys_addr
        u64le(body, pages << 12); // memory_size
        u64le(body, 0x7f00_0000_0000 + gpa); // userspace_addr
        u64le(body, u64::from(input.byte() % 2) << 12); // mmap_offset
        files.push(memfd(input, (pages + 1) << 12));
    };
    match code {
        req::SET_FEATURES | req::SET_PROTOCOL_FEATURES => {
            let v = if input.byte() % 4 == 0 {
                u64::from(input.u32()) | u64::from(input.u32()) << 32
            } else if code == req::SET_FEATURES {
                // Mostly what the device offers.
                crate::virtio::config::device_features(false) | 1 << 30
            } else {
                // MQ, REPLY_ACK, CONFIG, CONFIGURE_MEM_SLOTS.
                0x8209
            };
            u64le(&mut body, v);
        }
        req::SET_MEM_TABLE => {
            let n = 1 + u32::from(input.byte() % 3);
            u32le(&mut body, n);
            u32le(&mut body, 0); // padding
            for _ in 0..n {
                region(input, &mut body, files);
            }
        }
        req::ADD_MEM_REG | req::REM_MEM_REG => {
            u64le(&mut body, 0); // padding
            region(input, &mut body, files);
            if code == req::REM_MEM_REG {
                files.pop();
            }
        }
        req::SET_VRING_NUM | req::SET_VRING_BASE | req::GET_VRING_BASE | req::SET_VRING_ENABLE => {
            u32le(&mut body, queue);
            let num = match code {
                req::SET_VRING_NUM => 1 << (input.byte() % 11),
                req::SET_VRING_ENABLE => u32::from(input.byte() % 2),
                _ => u32::from(input.u16()),
            };
            u32le(&mut body, num);
        }
        req::SET_VRING_ADDR => {
            u32le(&mut body, queue);
            u32le(&mut body, 0); // flags
            let base = 0x7f00_0000_0000 + (u64::from(input.byte()) << 4);
            u64le(&mut body, base); // desc
            u64le(&mut body, base + 0x1000 + (u64::from(input.byte()) << 4)); // used
            u64le(&mut body, base + 0x800 + (u64::from(input.byte()) << 1)); // avail
            u64le(&mut body, 0); // log
        }
        req::SET_VRING_KICK | req::SET_VRING_CALL | req::SET_VRING_ERR => {
            if input.byte() % 8 == 0 {
                u64le(&mut body, u64::from(queue) | 0x100); // no fd
            } else {
                u64le(&mut body, u64::from(queue));
                let e = EventFd::new(0).expect("eventfd");
                // A kick the worker finds as soon as it is registered.
                let _ = e.write(1);
                // SAFETY: the File takes over the descriptor the EventFd
                // gives up.
                files.push(unsafe {
                    <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(
                        std::os::fd::IntoRawFd::into_raw_fd(e),
                    )
                });
            }
        }
        req::GET_CONFIG | req::SET_CONFIG => {
            let size = u32::from(input.byte() % 80);
            u32le(&mut body, u32::from(input.byte() % 64)); // offset
            u32le(&mut body, size);
            u32le(&mut body, 0); // flags
            body.extend((0..size).map(|_| input.byte()));
        }
        _ => {}
    }
    // Now and then, a header that lies about the payload's size.
    let size = match input.byte() % 16 {
        0 => u32::from(input.u16()),
        _ => body.len() as u32,
    };
    let flags: u32 = 1 | if input.byte() % 4 == 0 { 1 << 3 } else { 0 };
    let mut msg = Vec::with_capacity(12 + body.len());
    msg.extend_from_slice(&code.to_le_bytes());
    msg.extend_from_slice(&flags.to_le_bytes());
    msg.extend_from_slice(&size.to_le_bytes());
    msg.extend_from_slice(&body);
    msg
}

/// Sends a sequence of vhost-user messages chosen by `data` (memory
/// tables, vring num/addr/base/kick, features, config) to a device
/// serving a `null-co` node, then disconnects. The daemon must neither
/// panic nor hang, and must tear the connection down.
pub fn vhost_user_messages(data: &[u8]) {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;

    let dir = std::env::temp_dir().join(format!("strata-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a socket directory");
    let path = dir.join(format!("{:?}.sock", std::thread::current().id()));
    let mut listener = vhost::vhost_user::Listener::new(&path, true).expect("a listener");

    let mut opts = ExportOptions::new("fuzz0");
    opts.num_queues = 2;
    opts.poll_max_ns = 0;
    opts.stop_timeout = Duration::from_millis(200);
    let export = null_export(opts);

    let mut input = Input(data);
    // Connected before the daemon accepts: the connection waits in the
    // listener's backlog.
    let stream = UnixStream::connect(&path).expect("connect to the daemon");
    let client = {
        let data = data.to_vec();
        std::thread::spawn(move || {
            let mut input = Input(&data);
            let setup = input.byte() % 2 == 0;
            let count = 1 + usize::from(input.byte() % 24);
            let mut files = Vec::new();
            for i in 0..count {
                let code = match (setup, SETUP.get(i)) {
                    (true, Some(&c)) => c,
                    _ => ANY[usize::from(input.byte()) % ANY.len()],
                };
                let mut fds_of = Vec::new();
                let msg = message(&mut input, code, &mut fds_of);
                let fds: Vec<i32> = fds_of.iter().map(|f| f.as_raw_fd()).collect();
                if stream.send_with_fds(&[&msg[..]], &fds).is_err() {
                    break;
                }
                files.extend(fds_of);
            }
            // Let the device work on whatever rings it has, then leave.
            std::thread::sleep(Duration::from_millis(u64::from(input.byte() % 4)));
            drop(stream);
            drop(files);
        })
    };
    let _ = input.byte();
    let stop = crate::serve::StopHandle::new().expect("an eventfd");
    if let Err(e) = crate::vhost_user::serve_one(&mut listener, &export, &stop) {
        tracing::debug!("fuzz connection: {e:#}");
    }
    client.join().expect("the client did not panic");
    assert!(!export.connected(), "the connection was torn down");
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir(&dir);
}
