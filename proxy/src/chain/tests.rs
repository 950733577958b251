//! The chain runner with native Rust filters: every pause, hold, resume and
//! local reply, with no wasm and no sockets.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use lacewing_core::ProxyError;
use lacewing_core::filter::{
    FilterStatus, HttpFilter, HttpFilterFactory, NetworkFilter, NetworkFilterFactory,
};
use lacewing_core::stream::{
    ConnectionStream, HttpStream, LocalReply, SharedConnection, SharedStream, StreamInfo,
};

use super::http::ResponseBody;
use super::network::Flow;
use super::{ChainLimits, HttpChain, NetworkChain, Stop};

/// The phase a scripted filter is called in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    RequestHeaders,
    RequestBody { end: bool },
    RequestTrailers,
    ResponseHeaders,
    ResponseBody { end: bool },
    ResponseTrailers,
}

type Script = Arc<dyn Fn(Call, &SharedStream) -> FilterStatus + Send + Sync>;
type Log = Arc<Mutex<Vec<String>>>;

/// Makes filters that log every call (`name:phase:bytes`) and answer by `script`.
struct Scripted {
    name: &'static str,
    log: Log,
    script: Script,
}

struct ScriptedFilter {
    name: &'static str,
    log: Log,
    script: Script,
}

impl ScriptedFilter {
    fn call(&mut self, call: Call, stream: &SharedStream) -> FilterStatus {
        let bytes = {
            let s = stream.borrow();
            match call {
                Call::RequestBody { .. } => format!(":{}", s.request_body.len()),
                Call::ResponseBody { .. } => format!(":{}", s.response_body.len()),
                _ => String::new(),
            }
        };
        self.log
            .lock()
            .unwrap()
            .push(format!("{}:{call:?}{bytes}", self.name));
        (self.script)(call, stream)
    }
}

impl HttpFilter for ScriptedFilter {
    fn on_request_headers(&mut self, s: &SharedStream, _: bool) -> FilterStatus {
        self.call(Call::RequestHeaders, s)
    }
    fn on_request_body(&mut self, s: &SharedStream, end: bool) -> FilterStatus {
        self.call(Call::RequestBody { end }, s)
    }
    fn on_request_trailers(&mut self, s: &SharedStream) -> FilterStatus {
        self.call(Call::RequestTrailers, s)
    }
    fn on_response_headers(&mut self, s: &SharedStream, _: bool) -> FilterStatus {
        self.call(Call::ResponseHeaders, s)
    }
    fn on_response_body(&mut self, s: &SharedStream, end: bool) -> FilterStatus {
        self.call(Call::ResponseBody { end }, s)
    }
    fn on_response_trailers(&mut self, s: &SharedStream) -> FilterStatus {
        self.call(Call::ResponseTrailers, s)
    }
    fn on_log(&mut self, _: &SharedStream) {
        self.log.lock().unwrap().push(format!("{}:log", self.name));
    }
}

impl HttpFilterFactory for Scripted {
    fn name(&self) -> &str {
        self.name
    }
    fn create(&self, _: &SharedStream) -> Option<Box<dyn HttpFilter>> {
        Some(Box::new(ScriptedFilter {
            name: self.name,
            log: self.log.clone(),
            script: self.script.clone(),
        }))
    }
}

fn scripted(
    name: &'static str,
    log: &Log,
    script: impl Fn(Call, &SharedStream) -> FilterStatus + Send + Sync + 'static,
) -> Arc<dyn HttpFilterFactory> {
    Arc::new(Scripted {
        name,
        log: log.clone(),
        script: Arc::new(script),
    })
}

fn passes(name: &'static str, log: &Log) -> Arc<dyn HttpFilterFactory> {
    scripted(name, log, |_, _| FilterStatus::Continue)
}

const LIMITS: ChainLimits = ChainLimits {
    max_buffered: 1024,
    pause_limit: Duration::from_secs(30),
};

fn stream() -> SharedStream {
    let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let (parts, ()) = http::Request::get("/").body(()).unwrap().into_parts();
    HttpStream::new(StreamInfo::new(1, addr, addr, Arc::from("l")), parts).shared()
}

fn chain(filters: &[Arc<dyn HttpFilterFactory>]) -> (HttpChain, SharedStream) {
    chain_with(filters, LIMITS)
}

fn chain_with(
    filters: &[Arc<dyn HttpFilterFactory>],
    limits: ChainLimits,
) -> (HttpChain, SharedStream) {
    let s = stream();
    (HttpChain::new(filters, s.clone(), limits), s)
}

/// Limits under which a pause ends soon.
const IMPATIENT: ChainLimits = ChainLimits {
    max_buffered: 1024,
    pause_limit: Duration::from_millis(20),
};

type Source =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// A body of these chunks, then these trailers.
fn source(chunks: &[&'static str], trailers: Option<HeaderMap>) -> Source {
    let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = chunks
        .iter()
        .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
        .collect();
    frames.extend(trailers.map(|t| Ok(Frame::trailers(t))));
    StreamBody::new(futures_util::stream::iter(frames))
}

fn entries(log: &Log) -> Vec<String> {
    log.lock().unwrap().clone()
}

/// Runs `test` on a current-thread runtime with a `LocalSet`, as a worker does.
fn run<F: std::future::Future<Output = ()>>(test: F) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(tokio::task::LocalSet::new().run_until(test));
}

/// The request body as the upstream would read it: bytes and trailers, or the error.
async fn upstream_reads(
    chain: &HttpChain,
    body: Source,
) -> Result<(Bytes, Option<HeaderMap>), String> {
    let collected = match chain.request_body(body) {
        Ok(body) => match body.collect().await {
            Ok(collected) => collected,
            Err(never) => match never {},
        },
        Err(pumped) => pumped.collect().await.map_err(|e| e.to_string())?,
    };
    let trailers = collected.trailers().cloned();
    Ok((collected.to_bytes(), trailers))
}

/// Resumes `stream` from a task of its own, after `touch` ran on it (as a
/// callout reply or a tick would).
fn resume_later(stream: &SharedStream, touch: impl FnOnce(&mut HttpStream) + 'static) {
    let stream = stream.clone();
    tokio::task::spawn_local(async move {
        tokio::task::yield_now().await;
        touch(&mut stream.borrow_mut());
        stream.borrow().resume();
    });
}

#[test]
fn an_empty_chain_passes_everything_untouched() {
    run(async {
        let chain = HttpChain::empty();
        assert!(chain.is_empty());
        assert!(chain.stream().is_none());
        assert!(chain.request_headers(false).await.is_ok());
        assert!(chain.request_head().is_none());
        assert!(chain.request_body(source(&["a"], None)).is_ok(), "no pump");
        assert!(chain.take_request_stop().is_none());
        assert!(matches!(
            chain.response_body(source(&["a"], None)),
            ResponseBody::Plain(_)
        ));
    });
}

#[test]
fn headers_paused_stay_writable_until_the_filter_resumes() {
    run(async {
        let log = Log::default();
        let (chain, stream) = chain(&[
            scripted("auth", &log, |call, _| match call {
                Call::RequestHeaders => FilterStatus::StopIteration,
                _ => FilterStatus::Continue,
            }),
            passes("next", &log),
        ]);
        resume_later(&stream, |s| {
            s.request
                .headers
                .insert("x-decided", HeaderValue::from_static("later"));
        });
        chain.request_headers(true).await.expect("resumed");
        assert_eq!(
            entries(&log),
            ["auth:RequestHeaders", "next:RequestHeaders"]
        );
        let head = chain.request_head().expect("a head");
        assert_eq!(head.headers["x-decided"], "later");
    });
}

#[test]
fn a_filter_that_never_resumes_times_out_with_its_own_error() {
    run(async {
        let log = Log::default();
        let (chain, _stream) = chain_with(
            &[scripted("stuck", &log, |_, _| FilterStatus::StopIteration)],
            IMPATIENT,
        );
        match chain.request_headers(true).await {
            Err(Stop::Error(ProxyError::FilterTimeout { filter, limit })) => {
                assert_eq!(filter, "stuck");
                assert_eq!(limit, IMPATIENT.pause_limit);
            }
            other => panic!("expected a filter timeout, got {other:?}"),
        }
    });
}

#[test]
fn stop_and_buffer_sees_the_growing_body_and_forwards_it_whole() {
    run(async {
        let log = Log::default();
        let (chain, _stream) = chain(&[
            passes("first", &log),
            scripted("buffer", &log, |call, _| match call {
                Call::RequestBody { end: false } => FilterStatus::StopAndBuffer,
                _ => FilterStatus::Continue,
            }),
            passes("last", &log),
        ]);
        let (bytes, _) = upstream_reads(&chain, source(&["ab", "cd", "ef"], None))
            .await
            .unwrap();
        assert_eq!(bytes, "abcdef");
        assert_eq!(
            entries(&log),
            [
                "first:RequestBody { end: false }:2",
                "buffer:RequestBody { end: false }:2",
                "first:RequestBody { end: false }:2",
                "buffer:RequestBody { end: false }:4",
                "first:RequestBody { end: false }:2",
                "buffer:RequestBody { end: false }:6",
                // The source's end comes as an empty last chunk.
                "first:RequestBody { end: true }:0",
                "buffer:RequestBody { end: true }:6",
                "last:RequestBody { end: true }:6",
            ]
        );
    });
}

#[test]
fn a_request_body_over_the_buffer_limit_stops_with_413() {
    run(async {
        let log = Log::default();
        let (chain, _stream) =
            chain(&[scripted("buffer", &log, |_, _| FilterStatus::StopAndBuffer)]);
        let big: &'static str = Box::leak("x".repeat(LIMITS.max_buffered + 1).into_boxed_str());
        let read = upstream_reads(&chain, source(&[big], None)).await;
        assert!(read.is_err(), "the upstream body fails");
        match chain.take_request_stop() {
            Some(Stop::Error(err @ ProxyError::BodyTooLarge { .. })) => {
                assert_eq!(err.status(), StatusCode::PAYLOAD_TOO_LARGE)
            }
            other => panic!("expected 413, got {other:?}"),
        }
    });
}

#[test]
fn bytes_joining_a_full_buffer_are_over_the_limit_even_if_the_filter_would_go_on() {
    run(async {
        let log = Log::default();
        let (chain, _stream) = chain(&[scripted("until-end", &log, |call, _| match call {
            Call::RequestBody { end: false } => FilterStatus::StopAndBuffer,
            _ => FilterStatus::Continue,
        })]);
        let full: &'static str = Box::leak("a".repeat(LIMITS.max_buffered).into_boxed_str());
        let read = upstream_reads(&chain, source(&[full, "b"], None)).await;
        assert!(read.is_err(), "the upstream body fails");
        assert!(matches!(
            chain.take_request_stop(),
            Some(Stop::Error(ProxyError::BodyTooLarge { .. }))
        ));
        assert_eq!(
            entries(&log),
            [format!(
                "until-end:RequestBody {{ end: false }}:{}",
                LIMITS.max_buffered
            )],
            "the filter is not called with the over-limit buffer"
        );
    });
}

#[test]
fn stop_no_buffer_drops_the_chunk_and_later_chunks_still_reach_the_filter() {
    run(async {
        let log = Log::default();
        let (chain, _stream) = chain(&[scripted("take", &log, |call, s| {
            match call {
                // Takes the first chunk only.
                Call::RequestBody { .. } if s.borrow().request_body.as_ref() == b"secret" => {
                    FilterStatus::StopNoBuffer
                }
                _ => FilterStatus::Continue,
            }
        })]);
        let (bytes, _) = upstream_reads(&chain, source(&["secret", "public"], None))
            .await
            .unwrap();
        assert_eq!(bytes, "public");
    });
}

#[test]
fn a_body_held_at_its_end_goes_on_when_a_callback_resumes() {
    run(async {
        let log = Log::default();
        let (chain, stream) = chain(&[
            scripted("hold", &log, |call, s| match call {
                Call::RequestBody { end: true } => {
                    // Waits for an answer, as after a callout; the reply
                    // rewrites the body and resumes.
                    let stream = s.clone();
                    tokio::task::spawn_local(async move {
                        tokio::task::yield_now().await;
                        let mut st = stream.borrow_mut();
                        st.request_body.clear();
                        st.request_body.extend_from_slice(b"approved");
                        st.resume();
                    });
                    FilterStatus::StopAndBuffer
                }
                Call::RequestBody { end: false } => FilterStatus::StopAndBuffer,
                _ => FilterStatus::Continue,
            }),
            passes("after", &log),
        ]);
        drop(stream);
        let (bytes, _) = upstream_reads(&chain, source(&["pending"], None))
            .await
            .unwrap();
        assert_eq!(bytes, "approved");
        assert!(
            entries(&log).contains(&"after:RequestBody { end: true }:8".to_string()),
            "{:?}",
            entries(&log)
        );
    });
}

#[test]
fn a_body_held_by_a_filter_that_never_resumes_ends_with_a_filter_timeout() {
    run(async {
        let log = Log::default();
        let (chain, _stream) = chain_with(
            &[scripted("hold", &log, |call, _| match call {
                Call::RequestBody { .. } => FilterStatus::StopAndBuffer,
                _ => FilterStatus::Continue,
            })],
            IMPATIENT,
        );
        let read = upstream_reads(&chain, source(&["a"], None)).await;
        assert!(read.is_err());
        assert!(matches!(
            chain.take_request_stop(),
            Some(Stop::Error(ProxyError::FilterTimeout { .. }))
        ));
    });
}

#[test]
fn stopped_trailers_wait_for_the_resume_and_keep_the_filters_changes() {
    run(async {
        let log = Log::default();
        let (chain, _stream) = chain(&[
            scripted("sign", &log, |call, s| match call {
                Call::RequestTrailers => {
                    resume_later(s, |st| {
                        if let Some(t) = st.request_trailers.as_mut() {
                            t.insert("x-signature", HeaderValue::from_static("ok"));
                        }
                    });
                    FilterStatus::StopIteration
                }
                _ => FilterStatus::Continue,
            }),
            passes("after", &log),
        ]);
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", HeaderValue::from_static("1"));
        let (bytes, trailers) = upstream_reads(&chain, source(&["data"], Some(trailers)))
            .await
            .unwrap();
        assert_eq!(bytes, "data");
        let trailers = trailers.expect("trailers");
        assert_eq!(trailers["x-sum"], "1");
        assert_eq!(trailers["x-signature"], "ok");
        assert_eq!(
            entries(&log),
            [
                "sign:RequestBody { end: false }:4",
                "after:RequestBody { end: false }:4",
                "sign:RequestTrailers",
                "after:RequestTrailers",
            ]
        );
    });
}

#[test]
fn a_local_reply_runs_the_response_headers_of_the_filters_that_saw_the_request() {
    run(async {
        let log = Log::default();
        let (chain, stream) = chain(&[
            passes("outer", &log),
            scripted("replier", &log, |call, s| {
                if call == Call::RequestHeaders {
                    s.borrow_mut().local_reply = Some(LocalReply::new(
                        StatusCode::FORBIDDEN,
                        "no",
                        lacewing_core::ResponseFlag::LocalReply,
                    ));
                    return FilterStatus::StopIteration;
                }
                FilterStatus::Continue
            }),
            passes("inner", &log),
        ]);
        let stop = chain.request_headers(true).await.expect_err("answered");
        assert!(matches!(stop, Stop::Reply(r) if r.status == StatusCode::FORBIDDEN));
        let (head, ()) = http::Response::new(()).into_parts();
        stream.borrow_mut().response = Some(head);
        chain.response_headers(true).await.expect("passes");
        drop(chain);
        assert_eq!(
            entries(&log),
            [
                "outer:RequestHeaders",
                "replier:RequestHeaders",
                "replier:ResponseHeaders",
                "outer:ResponseHeaders",
                "outer:log",
                "replier:log",
                "inner:log",
            ]
        );
    });
}

#[test]
fn a_filtered_response_body_ends_the_filters_lives_when_it_is_done() {
    run(async {
        let log = Log::default();
        let (chain, stream) = chain(&[scripted("upper", &log, |call, s| {
            if let Call::ResponseBody { end: true } = call {
                let mut st = s.borrow_mut();
                let upper = st.response_body.to_ascii_uppercase();
                st.response_body.clear();
                st.response_body.extend_from_slice(&upper);
                return FilterStatus::Continue;
            }
            if let Call::ResponseBody { end: false } = call {
                return FilterStatus::StopAndBuffer;
            }
            FilterStatus::Continue
        })]);
        chain.request_headers(true).await.unwrap();
        let ResponseBody::Filtered(body) = chain.response_body(source(&["ab", "c"], None)) else {
            panic!("a filtered body");
        };
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes, "ABC");
        assert_eq!(entries(&log).last().map(String::as_str), Some("upper:log"));
        assert_eq!(stream.borrow().info.response_body_bytes, 3);
    });
}

#[test]
fn a_response_passing_every_filter_keeps_its_chunks_and_its_trailers_reach_the_filters() {
    run(async {
        let log = Log::default();
        let (chain, stream) = chain(&[
            passes("outer", &log),
            scripted("stamp", &log, |call, s| {
                if call == Call::ResponseTrailers
                    && let Some(t) = s.borrow_mut().response_trailers.as_mut()
                {
                    t.insert("x-stamped", HeaderValue::from_static("yes"));
                }
                FilterStatus::Continue
            }),
        ]);
        chain.request_headers(true).await.unwrap();
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let ResponseBody::Filtered(mut body) =
            chain.response_body(source(&["ab", "cd"], Some(trailers)))
        else {
            panic!("a filtered body");
        };
        let mut chunks = Vec::new();
        let mut got_trailers = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap();
            match frame.into_data() {
                Ok(data) => chunks.push(data),
                Err(frame) => got_trailers = frame.into_trailers().ok(),
            }
        }
        assert_eq!(chunks, ["ab", "cd"], "each chunk goes on as it came");
        let got_trailers = got_trailers.expect("trailers");
        assert_eq!(got_trailers["grpc-status"], "0");
        assert_eq!(got_trailers["x-stamped"], "yes");
        let calls = entries(&log);
        for expected in [
            "stamp:ResponseBody { end: false }:2",
            "outer:ResponseBody { end: false }:2",
            "stamp:ResponseTrailers",
            "outer:ResponseTrailers",
            "outer:log",
        ] {
            assert!(
                calls.iter().any(|c| c == expected),
                "{expected} in {calls:?}"
            );
        }
        assert_eq!(stream.borrow().info.response_body_bytes, 4);
    });
}

#[test]
fn a_response_chunk_held_mid_body_reaches_the_filter_again_with_the_chunks_after_it() {
    run(async {
        let log = Log::default();
        let (chain, _stream) = chain(&[scripted("hold-first", &log, |call, s| {
            let Call::ResponseBody { end: false } = call else {
                return FilterStatus::Continue;
            };
            let mut st = s.borrow_mut();
            if st.response_body.as_ref() == b"first" {
                return FilterStatus::StopAndBuffer;
            }
            // The held chunk comes back with the next one after it.
            let upper = st.response_body.to_ascii_uppercase();
            st.response_body.clear();
            st.response_body.extend_from_slice(&upper);
            FilterStatus::Continue
        })]);
        chain.request_headers(true).await.unwrap();
        let ResponseBody::Filtered(body) = chain.response_body(source(&["first", "-second"], None))
        else {
            panic!("a filtered body");
        };
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes, "FIRST-SECOND");
        assert_eq!(
            entries(&log),
            [
                "hold-first:RequestHeaders",
                "hold-first:ResponseBody { end: false }:5",
                "hold-first:ResponseBody { end: false }:12",
                "hold-first:ResponseBody { end: true }:0",
                "hold-first:log",
            ]
        );
    });
}

#[test]
fn a_response_stopped_by_a_filter_ends_its_body_with_an_error() {
    run(async {
        let log = Log::default();
        let (chain, _stream) = chain(&[scripted("reset", &log, |call, s| {
            if let Call::ResponseBody { .. } = call {
                s.borrow_mut().reset = true;
                return FilterStatus::StopIteration;
            }
            FilterStatus::Continue
        })]);
        chain.request_headers(true).await.unwrap();
        let ResponseBody::Filtered(body) = chain.response_body(source(&["x"], None)) else {
            panic!("a filtered body");
        };
        let error = body.collect().await.expect_err("the body fails");
        assert!(
            error.to_string().contains("stopped by the filter chain"),
            "{error}"
        );
        assert_eq!(entries(&log).last().map(String::as_str), Some("reset:log"));
    });
}

/// Network filters that log every call and answer by a script of their own.
struct NetScripted {
    log: Log,
    new_connection: FilterStatus,
    data: Arc<dyn Fn(&SharedConnection) -> FilterStatus + Send + Sync>,
}

struct NetFilter {
    log: Log,
    new_connection: FilterStatus,
    data: Arc<dyn Fn(&SharedConnection) -> FilterStatus + Send + Sync>,
}

impl NetworkFilter for NetFilter {
    fn on_new_connection(&mut self, _: &SharedConnection) -> FilterStatus {
        self.log.lock().unwrap().push("new".into());
        self.new_connection
    }
    fn on_downstream_data(&mut self, c: &SharedConnection, _: bool) -> FilterStatus {
        let n = c.borrow().downstream_data.len();
        self.log.lock().unwrap().push(format!("down:{n}"));
        (self.data)(c)
    }
    fn on_log(&mut self, _: &SharedConnection) {
        self.log.lock().unwrap().push("log".into());
    }
}

impl NetworkFilterFactory for NetScripted {
    fn name(&self) -> &str {
        "net"
    }
    fn create(&self, _: &SharedConnection) -> Option<Box<dyn NetworkFilter>> {
        Some(Box::new(NetFilter {
            log: self.log.clone(),
            new_connection: self.new_connection,
            data: self.data.clone(),
        }))
    }
}

fn connection() -> SharedConnection {
    let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
    ConnectionStream::new(StreamInfo::new(1, addr, addr, Arc::from("l"))).shared()
}

#[test]
fn a_connection_paused_on_accept_connects_once_resumed() {
    let log = Log::default();
    let conn = connection();
    let factory: Arc<dyn NetworkFilterFactory> = Arc::new(NetScripted {
        log: log.clone(),
        new_connection: FilterStatus::StopIteration,
        data: Arc::new(|_| FilterStatus::StopIteration),
    });
    let mut chain = NetworkChain::new(&[factory], conn.clone());
    assert!(!chain.new_connection(), "the upstream waits");
    assert!(chain.waiting_to_connect());
    conn.borrow_mut().downstream_data.extend_from_slice(b"hi");
    assert!(!chain.data(Flow::Downstream, false), "held by the filter");
    conn.borrow_mut().downstream_data.extend_from_slice(b"!");
    assert!(!chain.data(Flow::Downstream, false));
    assert!(chain.holds(Flow::Downstream));
    let (connect, down, up) = chain.resume([false, false]);
    assert!(connect && down && !up);
    assert!(!chain.holding() && !chain.waiting_to_connect());
    drop(chain);
    assert_eq!(entries(&log), ["new", "down:2", "down:3", "log"]);
}

#[test]
fn data_passing_every_filter_lets_a_paused_connection_go_on() {
    let log = Log::default();
    let conn = connection();
    let factory: Arc<dyn NetworkFilterFactory> = Arc::new(NetScripted {
        log: log.clone(),
        new_connection: FilterStatus::StopIteration,
        data: Arc::new(|_| FilterStatus::Continue),
    });
    let mut chain = NetworkChain::new(&[factory], conn.clone());
    assert!(!chain.new_connection());
    conn.borrow_mut().downstream_data.extend_from_slice(b"hi");
    assert!(chain.data(Flow::Downstream, false));
    assert!(!chain.waiting_to_connect());
}
