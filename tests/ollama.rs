//! /ollama/* proxy tests.

mod common;
