//! Step 1: the attribute's arguments and the annotated trait, as syn parses them.

use proc_macro2::TokenStream;
use syn::parse::Parser;
use syn::{ItemTrait, LitStr, Path};

/// What was written: the trait and the `crate = "…"` override, if any.
pub(crate) struct Parsed {
    pub(crate) item: ItemTrait,
    /// The path of the courier facade in generated code; `::courier` by default.
    pub(crate) krate: Path,
}

pub(crate) fn parse(args: TokenStream, input: TokenStream) -> syn::Result<Parsed> {
    let mut krate: Path = syn::parse_quote!(::courier);
    let arg_parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("crate") {
            let lit: LitStr = meta.value()?.parse()?;
            krate = lit.parse()?;
            Ok(())
        } else {
            Err(meta.error(
                "unknown #[service] argument; the only one is `crate = \"path::to::courier\"`",
            ))
        }
    });
    arg_parser.parse2(args)?;
    let item: ItemTrait = syn::parse2(input)
        .map_err(|e| syn::Error::new(e.span(), format!("#[service] goes on a trait: {e}")))?;
    Ok(Parsed { item, krate })
}
