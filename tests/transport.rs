//! Nodes talking over QUIC with mutual TLS.
