//! The proxy-wasm ABI contract shared by the Lacewing host and SDK.
#![no_std]
extern crate alloc;
