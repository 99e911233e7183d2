#![allow(dead_code)]
pub mod bombs;
pub mod fake;
pub mod faulty;
pub mod gateway;
pub mod postgres;
pub mod raw;
pub mod release;
pub mod scripted;
pub mod upload;
