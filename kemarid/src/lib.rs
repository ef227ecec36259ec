//! kemarid library
