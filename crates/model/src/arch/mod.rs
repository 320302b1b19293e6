pub mod llama;
pub mod phi2;
pub mod phi3;
