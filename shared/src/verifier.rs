//! Token verifier for services that follows revocations (being built).
