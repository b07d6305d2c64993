// The migrations are embedded in the binary (`sqlx::migrate!`): a new or changed migration must
// rebuild the crate, which cargo cannot tell by itself.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
