//! All clusters of one configuration snapshot, by name.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use lacewing_config::ClusterConfig;
use lacewing_core::ProxyError;
use lacewing_core::body::{BoxBody, BoxError};
use lacewing_core::callout::{self, LocalFuture};
use lacewing_core::metrics::Metrics;

use crate::cluster::{Cluster, RequestPolicy};
use crate::error::UpstreamError;

/// The clusters of a configuration, by name.
#[derive(Debug)]
pub struct Upstreams {
    clusters: HashMap<String, Arc<Cluster>>,
    /// What each cluster was built from, to tell an unchanged cluster in the next generation.
    built_from: HashMap<String, (ClusterConfig, Vec<SocketAddr>)>,
}

impl Upstreams {
    /// Builds every cluster, resolving each endpoint (`host:port`; a host name
    /// is resolved now and its first address used).
    pub fn new(clusters: &[ClusterConfig], metrics: &Metrics) -> Result<Arc<Self>, UpstreamError> {
        Self::build(clusters, metrics, None)
    }

    /// [`Upstreams::new`] for the next generation: a cluster whose
    /// configuration and resolved endpoints are those of a cluster in
    /// `previous` is that same cluster, with its pools, outlier and
    /// circuit-breaker state; the others are built anew.
    pub fn build(
        clusters: &[ClusterConfig],
        metrics: &Metrics,
        previous: Option<&Upstreams>,
    ) -> Result<Arc<Self>, UpstreamError> {
        let mut built = HashMap::with_capacity(clusters.len());
        let mut built_from = HashMap::with_capacity(clusters.len());
        for config in clusters {
            let addrs = config
                .endpoints
                .iter()
                .map(|endpoint| resolve(&config.name, endpoint))
                .collect::<Result<Vec<_>, _>>()?;
            let kept = previous.and_then(|p| {
                let (old_config, old_addrs) = p.built_from.get(&config.name)?;
                (old_config == config && *old_addrs == addrs)
                    .then(|| p.clusters.get(&config.name).cloned())
                    .flatten()
            });
            let cluster =
                kept.unwrap_or_else(|| Arc::new(Cluster::new(config, addrs.clone(), metrics)));
            if built.insert(config.name.clone(), cluster).is_some() {
                return Err(UpstreamError::DuplicateCluster(config.name.clone()));
            }
            built_from.insert(config.name.clone(), (config.clone(), addrs));
        }
        Ok(Arc::new(Self {
            clusters: built,
            built_from,
        }))
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

fn resolve(cluster: &str, endpoint: &str) -> Result<SocketAddr, UpstreamError> {
    let error = |reason: String| UpstreamError::Endpoint {
        cluster: cluster.to_string(),
        endpoint: endpoint.to_string(),
        reason,
    };
    if let Ok(addr) = endpoint.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if endpoint
        .rsplit_once(':')
        .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
    {
        return Err(error("expected host:port".into()));
    }
    endpoint
        .to_socket_addrs()
        .map_err(|e| error(format!("cannot resolve: {e}")))?
        .next()
        .ok_or_else(|| error("resolves to no address".into()))
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
    fn resolve_accepts_addresses_and_names() {
        assert_eq!(
            resolve("c", "127.0.0.1:80").unwrap(),
            "127.0.0.1:80".parse().unwrap()
        );
        assert_eq!(resolve("c", "localhost:81").unwrap().port(), 81);
    }

    #[test]
    fn resolve_errors_name_cluster_and_endpoint() {
        for bad in ["nope", "127.0.0.1", ":80", "host:notaport", "host:70000"] {
            let message = resolve("backend", bad).unwrap_err().to_string();
            assert!(
                message.contains("backend") && message.contains(bad),
                "{message}"
            );
        }
    }
}
