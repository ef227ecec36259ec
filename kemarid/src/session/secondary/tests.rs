//! Tests of the secondary session.
