//! FFI bindings to the sqlite-vec SQLite extension (see the folder's README.md).

#[link(name = "sqlite_vec0")]
extern "C" {
    pub fn sqlite3_vec_init();
}
