//! Route matching: pure, no I/O. A listener's routes are compiled once per
//! configuration and tried in order; the first match wins.

use std::sync::Arc;

use http::{HeaderName, Method, request::Parts};
use lacewing_config::{HeaderMatch, PathMatch, RouteConfig, RouteMatch};
use regex::Regex;

/// Why a route could not be compiled. The config loader validates first, so
/// these are a second line of defence.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("route `{route}`: invalid regex `{regex}`: {reason}")]
    Regex {
        route: String,
        regex: String,
        reason: String,
    },
    #[error("route `{route}`: invalid header name `{name}`")]
    HeaderName { route: String, name: String },
    #[error("route `{route}`: invalid method `{method}`")]
    Method { route: String, method: String },
}

/// A compiled match condition.
#[derive(Debug)]
pub struct Matcher {
    authority: Option<AuthorityMatch>,
    path: Option<PathMatcher>,
    method: Option<Method>,
    headers: Vec<HeaderMatcher>,
}

#[derive(Debug)]
enum AuthorityMatch {
    Exact(String),
    /// `*.example.com` stored as `.example.com`.
    Suffix(String),
}

#[derive(Debug)]
enum PathMatcher {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
struct HeaderMatcher {
    name: HeaderName,
    rule: HeaderRule,
}

#[derive(Debug)]
enum HeaderRule {
    Exact(String),
    Regex(Regex),
    Present(bool),
}

fn compile_regex(route: &str, pattern: &str) -> Result<Regex, RouteError> {
    // Anchored: a route regex must match the whole value, as in Envoy.
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| RouteError::Regex {
        route: route.to_string(),
        regex: pattern.to_string(),
        reason: e.to_string(),
    })
}

impl Matcher {
    /// Compiles a route's match block.
    pub fn compile(route: &str, m: &RouteMatch) -> Result<Self, RouteError> {
        let authority = m.authority.as_ref().map(|a| {
            let a = a.to_ascii_lowercase();
            match a.strip_prefix('*') {
                Some(suffix) => AuthorityMatch::Suffix(suffix.to_string()),
                None => AuthorityMatch::Exact(a),
            }
        });
        let path = match &m.path {
            None => None,
            Some(PathMatch::Exact(p)) => Some(PathMatcher::Exact(p.clone())),
            Some(PathMatch::Prefix(p)) => Some(PathMatcher::Prefix(p.clone())),
            Some(PathMatch::Regex(r)) => Some(PathMatcher::Regex(compile_regex(route, r)?)),
        };
        let method = m
            .method
            .as_ref()
            .map(|s| {
                Method::from_bytes(s.to_ascii_uppercase().as_bytes()).map_err(|_| {
                    RouteError::Method {
                        route: route.to_string(),
                        method: s.clone(),
                    }
                })
            })
            .transpose()?;
        let headers = m
            .headers
            .iter()
            .map(|h| compile_header(route, h))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            authority,
            path,
            method,
            headers,
        })
    }

    /// Whether a request head matches.
    pub fn matches(&self, parts: &Parts) -> bool {
        match &self.method {
            Some(method) if parts.method != *method => return false,
            // A tunnel is opened only where a route names CONNECT.
            None if parts.method == Method::CONNECT => return false,
            _ => {}
        }
        if let Some(path) = &self.path {
            let p = parts.uri.path();
            let ok = match path {
                PathMatcher::Exact(e) => p == e,
                PathMatcher::Prefix(prefix) => p.starts_with(prefix.as_str()),
                PathMatcher::Regex(r) => r.is_match(p),
            };
            if !ok {
                return false;
            }
        }
        if let Some(authority) = &self.authority {
            let Some(host) = request_host(parts) else {
                return false;
            };
            let ok = match authority {
                AuthorityMatch::Exact(e) => host.eq_ignore_ascii_case(e),
                AuthorityMatch::Suffix(s) => {
                    host.len() > s.len() && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
                }
            };
            if !ok {
                return false;
            }
        }
        self.headers.iter().all(|h| h.matches(parts))
    }
}

fn compile_header(route: &str, h: &HeaderMatch) -> Result<HeaderMatcher, RouteError> {
    let name = HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes()).map_err(|_| {
        RouteError::HeaderName {
            route: route.to_string(),
            name: h.name.clone(),
        }
    })?;
    let rule = if let Some(exact) = &h.exact {
        HeaderRule::Exact(exact.clone())
    } else if let Some(r) = &h.regex {
        HeaderRule::Regex(compile_regex(route, r)?)
    } else {
        HeaderRule::Present(h.present.unwrap_or(true))
    };
    Ok(HeaderMatcher { name, rule })
}

impl HeaderMatcher {
    fn matches(&self, parts: &Parts) -> bool {
        let mut values = parts.headers.get_all(&self.name).iter();
        match &self.rule {
            HeaderRule::Present(want) => values.next().is_some() == *want,
            HeaderRule::Exact(e) => values.any(|v| v.as_bytes() == e.as_bytes()),
            HeaderRule::Regex(r) => values.any(|v| v.to_str().is_ok_and(|s| r.is_match(s))),
        }
    }
}

/// The request's host without port: the URI authority (HTTP/2, absolute form)
/// or the Host header.
pub fn request_host(parts: &Parts) -> Option<&str> {
    let raw = match parts.uri.authority() {
        Some(a) => a.as_str(),
        None => parts.headers.get(http::header::HOST)?.to_str().ok()?,
    };
    Some(strip_port(raw))
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..h.len() + 1]);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// Routes of one listener, in order, each with its payload `T` (the data plane's route state).
#[derive(Debug)]
pub struct RouteTable<T> {
    routes: Vec<(Matcher, Arc<T>)>,
}

impl<T> RouteTable<T> {
    /// Compiles every route; `build` makes the payload of each.
    pub fn new<E: From<RouteError>>(
        routes: &[RouteConfig],
        mut build: impl FnMut(&RouteConfig) -> Result<T, E>,
    ) -> Result<Self, E> {
        let mut compiled = Vec::with_capacity(routes.len());
        for r in routes {
            compiled.push((Matcher::compile(&r.name, &r.matches)?, Arc::new(build(r)?)));
        }
        Ok(Self { routes: compiled })
    }

    /// The first route matching the request.
    pub fn find(&self, parts: &Parts) -> Option<&Arc<T>> {
        self.routes
            .iter()
            .find(|(m, _)| m.matches(parts))
            .map(|(_, t)| t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn matcher(yaml_like: RouteMatch) -> Matcher {
        Matcher::compile("r", &yaml_like).unwrap()
    }

    #[test]
    fn empty_match_matches_everything() {
        assert!(matcher(RouteMatch::default()).matches(&parts("GET", "/", &[])));
    }

    #[test]
    fn path_rules() {
        let exact = matcher(RouteMatch {
            path: Some(PathMatch::Exact("/a".into())),
            ..Default::default()
        });
        assert!(exact.matches(&parts("GET", "/a", &[])));
        assert!(!exact.matches(&parts("GET", "/a/b", &[])));
        let prefix = matcher(RouteMatch {
            path: Some(PathMatch::Prefix("/api".into())),
            ..Default::default()
        });
        assert!(prefix.matches(&parts("GET", "/api/v1?x=1", &[])));
        assert!(!prefix.matches(&parts("GET", "/ap", &[])));
        let regex = matcher(RouteMatch {
            path: Some(PathMatch::Regex("/v[0-9]+/.*".into())),
            ..Default::default()
        });
        assert!(regex.matches(&parts("GET", "/v2/users", &[])));
        assert!(
            !regex.matches(&parts("GET", "/x/v2/users", &[])),
            "anchored"
        );
    }

    #[test]
    fn method_and_headers() {
        let m = matcher(RouteMatch {
            method: Some("get".into()),
            headers: vec![
                HeaderMatch {
                    name: "X-Canary".into(),
                    exact: Some("1".into()),
                    regex: None,
                    present: None,
                },
                HeaderMatch {
                    name: "x-debug".into(),
                    exact: None,
                    regex: None,
                    present: Some(false),
                },
            ],
            ..Default::default()
        });
        assert!(m.matches(&parts("GET", "/", &[("x-canary", "1")])));
        assert!(!m.matches(&parts("POST", "/", &[("x-canary", "1")])));
        assert!(!m.matches(&parts("GET", "/", &[("x-canary", "2")])));
        assert!(!m.matches(&parts("GET", "/", &[("x-canary", "1"), ("x-debug", "y")])));
    }

    #[test]
    fn authority_exact_and_wildcard() {
        let exact = matcher(RouteMatch {
            authority: Some("orders".into()),
            ..Default::default()
        });
        assert!(exact.matches(&parts("GET", "/", &[("host", "orders:8080")])));
        assert!(exact.matches(&parts("GET", "http://ORDERS/x", &[])));
        assert!(!exact.matches(&parts("GET", "/", &[("host", "users")])));
        let wild = matcher(RouteMatch {
            authority: Some("*.example.com".into()),
            ..Default::default()
        });
        assert!(wild.matches(&parts("GET", "/", &[("host", "a.example.com")])));
        assert!(!wild.matches(&parts("GET", "/", &[("host", "example.com")])));
        assert!(!wild.matches(&parts("GET", "/", &[])));
    }

    #[test]
    fn connect_matches_only_a_route_naming_it() {
        let any = matcher(RouteMatch::default());
        assert!(!any.matches(&parts("CONNECT", "a.example:443", &[])));
        let tunnel = matcher(RouteMatch {
            method: Some("CONNECT".into()),
            ..Default::default()
        });
        assert!(tunnel.matches(&parts("CONNECT", "a.example:443", &[])));
    }

    #[test]
    fn bad_regex_is_an_error() {
        let err = Matcher::compile(
            "r",
            &RouteMatch {
                path: Some(PathMatch::Regex("(".into())),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("invalid regex"));
    }

    #[test]
    fn strip_port_handles_v6() {
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("a:80"), "a");
        assert_eq!(strip_port("a"), "a");
    }
}
