//! HTTP on the downstream side: serving connections, forwarding requests,
//! filter chains, local replies.

pub mod body;
pub mod filtered;
pub mod headers;
pub mod io;
pub mod local_reply;
pub mod proxy;
pub mod server;
