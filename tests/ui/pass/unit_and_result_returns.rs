#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum Oops {
    Bad,
}

#[courier::service]
trait Shapes {
    async fn nothing(&self);
    async fn unit(&self, x: u8) -> ();
    async fn fallible(&self, x: u8) -> Result<u8, Oops>;
    async fn nested(&self) -> Result<Option<Vec<String>>, Oops>;
}

struct Impl;
impl Shapes for Impl {
    async fn nothing(&self) {}
    async fn unit(&self, _x: u8) {}
    async fn fallible(&self, x: u8) -> Result<u8, Oops> {
        if x == 0 { Err(Oops::Bad) } else { Ok(x) }
    }
    async fn nested(&self) -> Result<Option<Vec<String>>, Oops> {
        Ok(None)
    }
}

async fn use_client(client: ShapesClient) -> Result<(), courier::RpcError> {
    let () = client.nothing().await?;
    let () = client.unit(1).await?;
    let _: Result<u8, Oops> = client.fallible(1).await?;
    let _: Result<Option<Vec<String>>, Oops> = client.nested().await?;
    Ok(())
}

fn main() {
    let _ = Impl.into_service();
    let _ = use_client;
}
