//! Model configuration and the Llama-family forward pass.
