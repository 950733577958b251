//! HTTP on the downstream side: serving connections, forwarding requests
//! (through the route's filter chain), local replies.

pub mod body;
pub mod h2_watch;
pub mod head_timer;
pub mod headers;
pub mod io;
pub mod local_reply;
pub mod progress;
pub mod proxy;
pub mod server;
pub mod tls;
