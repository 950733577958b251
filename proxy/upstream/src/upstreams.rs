//! All clusters of one configuration snapshot, by name.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http_body_util::BodyExt;
use lacewing_config::ClusterConfig;
use lacewing_core::ProxyError;
use lacewing_core::body::{BoxBody, BoxError};
use lacewing_core::callout::{self, LocalFuture};
use lacewing_core::metrics::Metrics;

use crate::cluster::{Cluster, RequestPolicy};
use crate::dns::{self, Resolver, Watched};
use crate::error::UpstreamError;
use crate::tls::UpstreamTls;
use lacewing_tls::LiveIdentity;

/// The clusters of a configuration, by name.
#[derive(Debug)]
pub struct Upstreams {
    clusters: HashMap<String, Arc<Cluster>>,
    /// What each cluster was built from, to tell an unchanged cluster in the next generation.
    built_from: HashMap<String, ClusterConfig>,
    /// Endpoint sets of clusters carried over from the previous generation
    /// that this one changes; applied by [`Upstreams::activate`].
    pending: Mutex<Vec<(Arc<Cluster>, Vec<SocketAddr>)>>,
}

impl Upstreams {
    /// Builds every cluster, resolving each endpoint (`host:port`; a host
    /// name is resolved now, blocking, and all its addresses used).
    pub fn new(clusters: &[ClusterConfig], metrics: &Metrics) -> Result<Arc<Self>, UpstreamError> {
        Self::build(clusters, metrics, None, None, None)
    }

    /// [`Upstreams::new`] for the next generation.
    ///
    /// A cluster whose configuration equals one in `previous` but for its
    /// endpoints is that same cluster, with its pools, outlier and
    /// circuit-breaker state; its new endpoint set takes effect at
    /// [`Upstreams::activate`], where endpoints it keeps keep their state.
    /// Host names are answered from `resolver` (call [`Resolver::prepare`]
    /// first; nothing is resolved here), or resolved now without one.
    /// Clusters with `tls` present `identity` (an error without one).
    pub fn build(
        clusters: &[ClusterConfig],
        metrics: &Metrics,
        previous: Option<&Upstreams>,
        resolver: Option<&Resolver>,
        identity: Option<&Arc<LiveIdentity>>,
    ) -> Result<Arc<Self>, UpstreamError> {
        let mut built = HashMap::with_capacity(clusters.len());
        let mut built_from = HashMap::with_capacity(clusters.len());
        let mut pending = Vec::new();
        for config in clusters {
            let mut answers = HashMap::new();
            for endpoint in &config.endpoints {
                check_endpoint(&config.name, endpoint)?;
                if !dns::is_host_name(endpoint) {
                    continue;
                }
                let answer = match resolver {
                    Some(resolver) => resolver
                        .lookup(endpoint)
                        .unwrap_or_else(|| Err("not resolved yet".into())),
                    None => dns::resolve_now(endpoint),
                };
                if let Err(reason) = &answer {
                    return Err(UpstreamError::Endpoint {
                        cluster: config.name.clone(),
                        endpoint: endpoint.clone(),
                        reason: reason.clone(),
                    });
                }
                answers.insert(endpoint.as_str(), answer);
            }
            let addrs = dns::addresses(&config.endpoints, |name| answers.get(name).cloned());
            let kept = previous.and_then(|p| {
                let old = p.built_from.get(&config.name)?;
                let same = ClusterConfig {
                    endpoints: config.endpoints.clone(),
                    ..old.clone()
                } == *config;
                same.then(|| p.clusters.get(&config.name).cloned())
                    .flatten()
            });
            let cluster = match kept {
                Some(cluster) => {
                    if cluster.endpoints() != addrs {
                        pending.push((cluster.clone(), addrs));
                    }
                    cluster
                }
                None => {
                    let tls = config
                        .tls
                        .as_ref()
                        .map(|tls| {
                            UpstreamTls::new(&config.name, config.protocol, tls, identity, metrics)
                        })
                        .transpose()?;
                    Arc::new(Cluster::new(config, addrs, metrics, tls))
                }
            };
            if built.insert(config.name.clone(), cluster).is_some() {
                return Err(UpstreamError::DuplicateCluster(config.name.clone()));
            }
            built_from.insert(config.name.clone(), config.clone());
        }
        Ok(Arc::new(Self {
            clusters: built,
            built_from,
            pending: Mutex::new(pending),
        }))
    }

    /// Makes this generation's endpoint sets live in the clusters it carried
    /// over, and has `resolver` keep its host-name endpoints up to date.
    pub fn activate(&self, resolver: Option<&Resolver>) {
        let pending =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        for (cluster, addrs) in pending {
            cluster.set_endpoints(&addrs);
        }
        if let Some(resolver) = resolver {
            let watched = self
                .built_from
                .values()
                .filter(|c| c.endpoints.iter().any(|e| dns::is_host_name(e)))
                .filter_map(|c| {
                    Some(Watched {
                        cluster: Arc::downgrade(self.clusters.get(&c.name)?),
                        specs: c.endpoints.clone(),
                    })
                })
                .collect();
            resolver.watch(watched);
        }
    }

    /// Host-name endpoints of these cluster configs, for [`Resolver::prepare`].
    pub fn host_names(clusters: &[ClusterConfig]) -> impl Iterator<Item = &str> {
        clusters
            .iter()
            .flat_map(|c| c.endpoints.iter().map(String::as_str))
            .filter(|e| dns::is_host_name(e))
    }

    /// The cluster of that name.
    pub fn cluster(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters.get(name)
    }

    /// Every cluster, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Cluster>> {
        self.clusters.values()
    }
}

/// An endpoint must be `ip:port` or `host:port`.
fn check_endpoint(cluster: &str, endpoint: &str) -> Result<(), UpstreamError> {
    if endpoint.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    if endpoint
        .rsplit_once(':')
        .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
    {
        return Err(UpstreamError::Endpoint {
            cluster: cluster.to_string(),
            endpoint: endpoint.to_string(),
            reason: "expected host:port".into(),
        });
    }
    Ok(())
}

impl callout::Upstreams for Upstreams {
    fn has_cluster(&self, name: &str) -> bool {
        self.clusters.contains_key(name)
    }

    /// Sends through the cluster with [`RequestPolicy::callout`]: connect failures
    /// are retried, statuses are not; `timeout` bounds the wait for the head.
    fn send(
        &self,
        cluster: &str,
        request: http::Request<BoxBody>,
        timeout: Duration,
    ) -> LocalFuture<Result<http::Response<BoxBody>, ProxyError>> {
        let found = self
            .clusters
            .get(cluster)
            .cloned()
            .ok_or_else(|| ProxyError::NoHealthyUpstream(cluster.to_string()));
        Box::pin(async move {
            let cluster = found?;
            let answer = cluster
                .send(request, &RequestPolicy::callout(timeout))
                .await?;
            Ok(answer
                .response
                .map(|incoming| incoming.map_err(|e| Box::new(e) as BoxError).boxed_unsync()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_addresses_or_names() {
        let metrics = Metrics::new();
        let config = |endpoints: &[&str]| ClusterConfig {
            name: "backend".into(),
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            protocol: Default::default(),
            lb: Default::default(),
            connect_timeout: lacewing_config::units::Dur(Duration::from_secs(1)),
            idle_timeout: lacewing_config::units::Dur(Duration::from_secs(1)),
            circuit_breaker: Default::default(),
            retry_budget: Default::default(),
            outlier_detection: Default::default(),
            tls: None,
        };
        let built = Upstreams::new(&[config(&["127.0.0.1:80", "localhost:81"])], &metrics).unwrap();
        let endpoints = built.cluster("backend").unwrap().endpoints();
        assert_eq!(endpoints[0], "127.0.0.1:80".parse().unwrap());
        assert!(
            endpoints[1..].iter().all(|e| e.port() == 81),
            "{endpoints:?}"
        );
        for bad in ["nope", "127.0.0.1", ":80", "host:notaport", "host:70000"] {
            let message = Upstreams::new(&[config(&[bad])], &metrics)
                .unwrap_err()
                .to_string();
            assert!(
                message.contains("backend") && message.contains(bad),
                "{message}"
            );
        }
    }
}
