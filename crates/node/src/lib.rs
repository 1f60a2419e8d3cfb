//! The clusterctl agent runtime.
#![forbid(unsafe_code)]
