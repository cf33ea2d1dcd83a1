//! The library half of the `loupe` package: code shared by the binary and its
//! benchmarks.

pub mod synthetic;
