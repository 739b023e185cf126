//! QUIC + mutual TLS between nodes (the only module that imports quinn/rustls/rcgen); framing with size limits.
