//! The network filter chain of one TCP connection.
//!
//! As in Envoy: a filter that stops in `on_new_connection` keeps the upstream
//! from being connected until it resumes the connection or data from
//! downstream passes every filter; a filter that stops on data holds those
//! bytes (later bytes join them, and the filters are called again with all of
//! them) until it continues on a later call or resumes the connection, which
//! passes the held bytes on to the filters after it.

use std::sync::Arc;

use lacewing_core::filter::{FilterStatus, NetworkFilter, NetworkFilterFactory, PeerType};
use lacewing_core::stream::SharedConnection;

/// Which way bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// From the client to the upstream.
    Downstream,
    /// From the upstream to the client.
    Upstream,
}

/// The filters of one connection.
pub struct NetworkChain {
    conn: SharedConnection,
    filters: Vec<Box<dyn NetworkFilter>>,
    /// How many filters `on_new_connection` ran on.
    initialized: usize,
    /// The filter that stopped `on_new_connection`, until the connection goes on.
    new_connection_stopped: Option<usize>,
    /// The filter holding bytes of each flow.
    held: [Option<usize>; 2],
}

impl NetworkChain {
    /// The filters `factories` make for `conn` (a factory may decline it).
    pub fn new(factories: &[Arc<dyn NetworkFilterFactory>], conn: SharedConnection) -> Self {
        let filters = factories.iter().filter_map(|f| f.create(&conn)).collect();
        Self {
            conn,
            filters,
            initialized: 0,
            new_connection_stopped: None,
            held: [None, None],
        }
    }

    /// Whether the chain has no filters.
    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// Whether a filter asked to close the connection.
    pub fn closing(&self) -> bool {
        self.conn.borrow().close
    }

    /// Runs `on_new_connection`; true when every filter continued, so the
    /// upstream may be connected.
    pub fn new_connection(&mut self) -> bool {
        self.new_connection_from(0)
    }

    fn new_connection_from(&mut self, from: usize) -> bool {
        for i in from..self.filters.len() {
            self.initialized = i + 1;
            let status = self.filters[i].on_new_connection(&self.conn);
            if !status.is_continue() {
                self.new_connection_stopped = Some(i);
                return false;
            }
        }
        self.new_connection_stopped = None;
        true
    }

    /// Whether the connection waits for a filter that stopped `on_new_connection`.
    pub fn waiting_to_connect(&self) -> bool {
        self.new_connection_stopped.is_some()
    }

    /// Whether a filter holds bytes of some flow.
    pub fn holding(&self) -> bool {
        self.held.iter().any(Option::is_some)
    }

    /// Whether a filter holds the bytes of `flow`.
    pub fn holds(&self, flow: Flow) -> bool {
        self.held[flow as usize].is_some()
    }

    /// New bytes of `flow` are in the connection's buffer: runs every filter
    /// on all buffered bytes. True when they may be forwarded.
    pub fn data(&mut self, flow: Flow, end_of_stream: bool) -> bool {
        self.data_from(flow, 0, end_of_stream)
    }

    fn data_from(&mut self, flow: Flow, from: usize, end_of_stream: bool) -> bool {
        let count = self.filters.len();
        for step in from..count {
            // Upstream bytes walk the filters in reverse, as Envoy's write filters do.
            let i = match flow {
                Flow::Downstream => step,
                Flow::Upstream => count - 1 - step,
            };
            if i >= self.initialized {
                // Data reaching a filter after one that stopped
                // `on_new_connection` starts it first, as in Envoy.
                self.initialized = i + 1;
                if !self.filters[i].on_new_connection(&self.conn).is_continue() {
                    self.new_connection_stopped = Some(i);
                    self.held[flow as usize] = Some(step);
                    return false;
                }
            }
            let filter = &mut self.filters[i];
            let status = match flow {
                Flow::Downstream => filter.on_downstream_data(&self.conn, end_of_stream),
                Flow::Upstream => filter.on_upstream_data(&self.conn, end_of_stream),
            };
            if status != FilterStatus::Continue {
                self.held[flow as usize] = Some(step);
                return false;
            }
        }
        self.held[flow as usize] = None;
        if flow == Flow::Downstream {
            // Data passed every filter: the upstream may be connected.
            self.new_connection_stopped = None;
        }
        true
    }

    /// The connection was resumed: a filter stopped on `on_new_connection`
    /// lets the filters after it run; held bytes go on past the filter that
    /// held them. Returns `(connect, forward downstream bytes, forward upstream bytes)`.
    pub fn resume(&mut self, end_of_stream: [bool; 2]) -> (bool, bool, bool) {
        let connect = match self.new_connection_stopped {
            Some(i) => self.new_connection_from(i + 1),
            None => false,
        };
        let mut forward = [false; 2];
        for (flow, slot) in [Flow::Downstream, Flow::Upstream]
            .into_iter()
            .zip(&mut forward)
        {
            if let Some(step) = self.held[flow as usize] {
                *slot = self.data_from(flow, step + 1, end_of_stream[flow as usize]);
            }
        }
        (connect, forward[0], forward[1])
    }

    /// One side closed.
    pub fn closed(&mut self, flow: Flow, peer: PeerType) {
        for f in self.filters.iter_mut() {
            match flow {
                Flow::Downstream => f.on_downstream_close(&self.conn, peer),
                Flow::Upstream => f.on_upstream_close(&self.conn, peer),
            }
        }
    }
}

impl Drop for NetworkChain {
    fn drop(&mut self) {
        for f in self.filters.iter_mut() {
            f.on_log(&self.conn);
        }
    }
}
