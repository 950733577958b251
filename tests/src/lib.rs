//! Builders for end-to-end tests: upstream servers, proxies and clients on 127.0.0.1:0.
