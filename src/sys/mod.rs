//! The only home of `unsafe` and raw syscalls: loop-device ioctls, mount(2),
//! and reading the kernel's tables of mounts and loop devices. Every unsafe
//! block carries a `SAFETY:` comment.
#![allow(unsafe_code)]

pub mod fd;
pub mod fuse;
pub mod loopdev;
pub mod malloc;
pub mod mount;
pub mod signal;
