//! Credential-injecting proxy (being built).
