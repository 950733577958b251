//! Lacewing upstream clusters: endpoints, load balancing, connection pools, timeouts, retries, outlier ejection and circuit breaking.
