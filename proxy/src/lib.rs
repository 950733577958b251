//! The Lacewing data plane: listeners, routing, upstream clusters, admin and the worker runtimes.
