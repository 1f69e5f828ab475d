//! Runs the unit tests of the fio bench's target selection
//! (benches/fio/kind.rs): the bench is built without a test harness.

#[allow(dead_code)]
#[path = "../benches/fio/kind.rs"]
mod kind;
