//! The hostile-input suite: requests an attacker would send, one module per route family or
//! defect class. Every case asserts a clear 4xx JSON error (both `detail` and the
//! OpenAI-style `error`) and that the gateway still answers afterwards.

#[path = "../common/mod.rs"]
mod common;

mod access;
mod accounts;
mod auth;
mod budget;
mod chat;
mod extract;
mod files;
mod library;
mod limits;
mod multipart_prop;
mod presets;
mod quality;
mod support;
mod ui;
mod users;
mod wire;
