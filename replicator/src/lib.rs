pub mod nbd;
pub mod store;
