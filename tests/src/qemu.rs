//! qemu-img and qemu-io, the reference implementation of qcow2.

use std::path::Path;
use std::process::Command;

/// Runs `qemu-img ARGS`, returning (exit code, stdout, stderr).
pub fn qemu_img(args: &[&str]) -> (i32, String, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is installed (ci/test installs it)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `qemu-img ARGS`, which must succeed; returns stdout.
pub fn qemu_img_ok(args: &[&str]) -> String {
    let (code, out, err) = qemu_img(args);
    assert_eq!(code, 0, "qemu-img {args:?} failed:\n{out}{err}");
    out
}

/// Runs a qemu-io command on a qcow2 image.
pub fn qemu_io(path: &Path, cmd: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", cmd])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-io {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Creates an empty `fmt` image of `size` (as qemu-img spells sizes).
pub fn create(path: &Path, fmt: &str, size: &str) {
    qemu_img_ok(&["create", "-q", "-f", fmt, path.to_str().unwrap(), size]);
}

/// The image's content as qemu-img reads it.
pub fn to_raw(path: &Path) -> Vec<u8> {
    let raw = path.with_extension("as-raw");
    qemu_img_ok(&[
        "convert",
        "-O",
        "raw",
        path.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let data = std::fs::read(&raw).unwrap();
    std::fs::remove_file(raw).unwrap();
    data
}

/// `qemu-img check`'s exit code and output.
pub fn check(path: &Path) -> (i32, String) {
    let (code, out, err) = qemu_img(&["check", path.to_str().unwrap()]);
    (code, out + &err)
}
