//! Training: the loop, optimiser, schedule, metrics.
pub mod full;
pub mod loss;
pub mod optim;
pub mod parallel;
pub mod plot;
pub mod schedule;
pub mod trainer;
