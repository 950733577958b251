//! ext-auth: a test filter for the SDK's callouts and ticks. Each request is
//! checked with `GET /check` on the configured cluster (the request path in
//! `x-check-path`); 200 lets it through with `x-auth` set from the reply's
//! `x-verdict`, anything else (or no reply) answers 403. The plugin counts its
//! ticks in the gauge `ext_auth_ticks`. With `"grpc": true` the check is the
//! unary gRPC call `auth.Checker/Check` (the path as the message): status 0
//! lets the request through with `x-auth` set to the reply message.

use std::rc::Rc;

use lacewing_sdk::callout::{GrpcCall, HttpCall};
use lacewing_sdk::http::{Headers, send_response};
use lacewing_sdk::metrics::Gauge;
use lacewing_sdk::{Action, Filter, Plugin};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    cluster: String,
    #[serde(default)]
    tick_ms: u32,
    #[serde(default)]
    grpc: bool,
}

pub struct ExtAuth {
    cluster: String,
    tick_ms: u32,
    grpc: bool,
    ticks: Option<Gauge>,
}

impl Plugin for ExtAuth {
    type Config = Config;
    type Filter = Check;

    fn configure(c: Config) -> Result<Self, String> {
        Ok(ExtAuth {
            cluster: c.cluster,
            tick_ms: c.tick_ms,
            grpc: c.grpc,
            ticks: Gauge::define("ext_auth_ticks").ok(),
        })
    }

    fn new_filter(self: &Rc<Self>) -> Check {
        Check(self.clone())
    }

    fn tick_period_ms(&self) -> u32 {
        self.tick_ms
    }

    fn on_tick(&self) {
        if let Some(g) = self.ticks {
            let _ = g.add(1);
        }
    }
}

pub struct Check(Rc<ExtAuth>);

fn deny(reason: &str) -> Action {
    let _ = send_response(
        403,
        &[("x-denied-by", "ext-auth")],
        reason.as_bytes(),
        "ext_auth",
    );
    Action::Pause
}

impl Filter for Check {
    fn on_request_headers(&mut self, headers: &Headers, _end_of_stream: bool) -> Action {
        let path = headers.get(":path").ok().flatten().unwrap_or_default();
        if self.0.grpc {
            let sent = GrpcCall::new(&self.0.cluster, "auth.Checker", "Check")
                .message(path.into_bytes())
                .send(|_f: &mut Check, reply| {
                    if reply.status != 0 {
                        return deny(&format!("grpc check said {}\n", reply.status));
                    }
                    let verdict = String::from_utf8_lossy(&reply.message).into_owned();
                    if let Err(e) = Headers::REQUEST.set("x-auth", &verdict) {
                        lacewing_sdk::warn!("ext-auth: {e}");
                    }
                    Action::Continue
                });
            return match sent {
                Ok(_) => Action::Pause,
                Err(e) => deny(&format!("cannot call the checker: {e}\n")),
            };
        }
        let sent = HttpCall::new(&self.0.cluster)
            .path("/check")
            .header("x-check-path", &path)
            .timeout_ms(5000)
            .send(|_f: &mut Check, reply| match reply {
                Ok(r) if r.status == 200 => {
                    let verdict = r.header("x-verdict").unwrap_or("allowed").to_string();
                    if let Err(e) = Headers::REQUEST.set("x-auth", &verdict) {
                        lacewing_sdk::warn!("ext-auth: {e}");
                    }
                    Action::Continue
                }
                Ok(r) => deny(&format!("check said {}\n", r.status)),
                Err(e) => deny(&format!("{e}\n")),
            });
        match sent {
            Ok(_) => Action::Pause,
            Err(e) => deny(&format!("cannot call the checker: {e}\n")),
        }
    }
}

lacewing_sdk::register!(ExtAuth);
