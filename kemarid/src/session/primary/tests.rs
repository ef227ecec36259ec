//! Tests of the primary session.
