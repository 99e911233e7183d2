#![allow(dead_code)]
pub mod fake;
pub mod gateway;
pub mod raw;
pub mod release;
pub mod upload;
