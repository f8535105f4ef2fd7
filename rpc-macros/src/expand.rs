//! Step 3: the generated code. One function per generated item.
//!
//! Everything generated names only absolute paths (`::core::…`, `::std::…`) and the
//! facade's `__private` module (through the `crate = "…"` path), so it works in a crate
//! with `#![no_implicit_prelude]` and with a renamed courier dependency.

use proc_macro2::{Ident, Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;

use crate::model::{Method, Service};

pub(crate) fn expand(service: &Service) -> TokenStream {
    let items = [
        trait_def(service),
        client(service),
        server(service),
        wire_type_checks(service),
    ];
    quote!(#(#items)*)
}

/// `<crate>::__private`: the one module generated code reaches into.
fn private(service: &Service) -> TokenStream {
    let krate = &service.krate;
    quote!(#krate::__private)
}

fn client_ident(service: &Service) -> Ident {
    format_ident!("{}Client", service.name)
}

fn service_ident(service: &Service) -> Ident {
    format_ident!("{}Service", service.name)
}

fn const_ident(method: &Method) -> Ident {
    format_ident!("{}", method.name.to_uppercase())
}

/// The trait, with each `async fn` turned into `fn … -> impl Future<Output = …> + Send`,
/// so that handlers can run on a multi-threaded runtime. Implementations may still be
/// written with `async fn`.
fn trait_def(service: &Service) -> TokenStream {
    let Service {
        attrs,
        vis,
        ident,
        supertraits,
        ..
    } = service;
    let service_ident = service_ident(service);
    let supertraits = (!supertraits.is_empty()).then(|| quote!(#supertraits +));
    let methods = service.methods.iter().map(|m| {
        let Method {
            attrs,
            ident,
            args,
            output,
            ..
        } = m;
        let context = m.context.as_ref().map(|c| {
            let (name, ty) = (&c.ident, &c.ty);
            if c.by_ref {
                quote!(#name: &#ty,)
            } else {
                quote!(#name: #ty,)
            }
        });
        let args = args.iter().map(|(name, ty)| quote!(#name: #ty));
        quote! {
            #(#attrs)*
            fn #ident(&self, #context #(#args),*)
                -> impl ::core::future::Future<Output = #output> + ::core::marker::Send;
        }
    });
    quote! {
        #(#attrs)*
        #vis trait #ident: #supertraits ::core::marker::Send + ::core::marker::Sync + 'static {
            #(#methods)*

            /// Wraps this implementation for a server:
            /// `Server::new(config).add_service(implementation.into_service())`.
            fn into_service(self) -> #service_ident<Self>
            where
                Self: ::core::marker::Sized,
            {
                #service_ident::new(self)
            }
        }
    }
}

fn client(service: &Service) -> TokenStream {
    let Service {
        vis, ident, name, ..
    } = service;
    let p = private(service);
    let client = client_ident(service);
    let doc = format!(
        "Client of the [`{ident}`] service: one `async` method per trait method, returning \
         `Result<ReturnType, RpcError>`.\n\n`Err` is a transport-level failure (timeout, \
         connection lost, unknown method…); a method that returns `Result<T, E>` delivers its \
         own `E` inside `Ok`."
    );
    let consts = service.methods.iter().map(|m| {
        let c = const_ident(m);
        let cfgs = &m.cfgs;
        let wire = format!("{name}.{}", m.name);
        let doc = format!("`\"{wire}\"`: the wire name of `{}`.", m.name);
        quote!(#(#cfgs)* #[doc = #doc] pub const #c: &'static str = #wire;)
    });
    let all = service.methods.iter().map(|m| {
        let cfgs = &m.cfgs;
        let wire = format!("{name}.{}", m.name);
        quote!(#(#cfgs)* #wire,)
    });
    let methods = service.methods.iter().map(|m| client_method(service, m));
    quote! {
        #[doc = #doc]
        #[derive(::core::clone::Clone)]
        #vis struct #client<F = #p::Bincode> {
            client: #p::Client,
            options: #p::CallOptions,
            format: ::core::marker::PhantomData<fn() -> F>,
        }

        impl #client {
            #[doc = concat!("`\"", #name, "\"`: the service's name on the wire.")]
            pub const SERVICE_NAME: &'static str = #name;
            /// Every method's wire name.
            pub const METHODS: &'static [&'static str] = &[#(#all)*];
            #(#consts)*

            /// A client calling over `client`, with bincode payloads.
            pub fn new(client: #p::Client) -> Self {
                Self::with_format(client)
            }
        }

        impl<F: #p::Format> #client<F> {
            /// A client calling over `client`, with payloads in format `F`.
            pub fn with_format(client: #p::Client) -> Self {
                #client { client, options: ::core::default::Default::default(), format: ::core::marker::PhantomData }
            }

            /// A copy of this client whose calls use `options` (deadline, metadata).
            pub fn with_options(&self, options: #p::CallOptions) -> Self {
                #client { client: ::core::clone::Clone::clone(&self.client), options, format: ::core::marker::PhantomData }
            }

            /// A copy of this client whose calls have a deadline of `timeout` from each call.
            pub fn with_timeout(&self, timeout: ::core::time::Duration) -> Self {
                self.with_options(::core::clone::Clone::clone(&self.options).with_timeout(timeout))
            }

            /// A copy of this client whose calls carry one more metadata entry.
            pub fn with_metadata(
                &self,
                key: impl ::core::convert::Into<#p::Utf8Bytes>,
                value: impl ::core::convert::Into<#p::bytes::Bytes>,
            ) -> Self {
                self.with_options(::core::clone::Clone::clone(&self.options).with_metadata(key, value))
            }

            /// The options this client's calls use.
            pub fn options(&self) -> &#p::CallOptions {
                &self.options
            }

            /// The underlying connection handle.
            pub fn client(&self) -> &#p::Client {
                &self.client
            }

            #(#methods)*
        }

        impl<F> ::core::fmt::Debug for #client<F> {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                f.debug_struct(::core::stringify!(#client))
                    .field("client", &self.client)
                    .field("options", &self.options)
                    .finish()
            }
        }
    }
}

fn client_method(service: &Service, m: &Method) -> TokenStream {
    let p = private(service);
    let Method {
        carried,
        ident,
        args,
        output,
        ..
    } = m;
    let wire = format!("{}.{}", service.name, m.name);
    let has_doc = carried.iter().any(|a| a.path().is_ident("doc"));
    let default_doc = (!has_doc).then(|| {
        let doc = format!("Calls `{wire}` on the server.");
        quote!(#[doc = #doc])
    });
    let params = args.iter().map(|(name, ty)| quote!(#name: #ty));
    // A `Vec<u8>` goes as one byte string (same wire bytes, no call per byte).
    let sent = args.iter().map(|(name, ty)| {
        if is_byte_vec(ty) {
            quote!(#p::AsBytes(&#name))
        } else {
            quote!(&#name)
        }
    });
    let (received, unwrap) = if is_byte_vec(output) {
        (quote!(#p::ByteVec), quote!(.map(|bytes| bytes.0)))
    } else {
        (quote!(#output), quote!())
    };
    quote! {
        #(#carried)*
        #default_doc
        pub async fn #ident(&self, #(#params),*) -> ::core::result::Result<#output, #p::RpcError> {
            // Small arguments are held inline: a call among others is encoded into the
            // send queue from there, with no allocation.
            let payload = <F as #p::Format>::encode_small(&(#(#sent,)*))
                .map_err(|e| <#p::RpcError as ::core::convert::From<#p::FormatError>>::from(e.context("request")))?;
            let answer = self
                .client
                .call(#p::Utf8Bytes::from_static(#wire), payload, &self.options)
                .await?;
            <F as #p::Format>::decode::<#received>(&answer)#unwrap.map_err(|error| {
                <#p::RpcError as ::core::convert::From<#p::ProtocolError>>::from(#p::ProtocolError::InvalidPayload {
                    what: "response",
                    method: <::std::string::String as ::core::convert::From<&str>>::from(#wire),
                    error,
                })
            })
        }
    }
}

/// Whether `ty` is written `Vec<u8>` (or `std::vec::Vec<u8>`, `alloc::vec::Vec<u8>`):
/// such values are sent as one byte string.
fn is_byte_vec(ty: &syn::Type) -> bool {
    let syn::Type::Path(path) = ty else {
        return false;
    };
    if path.qself.is_some() {
        return false;
    }
    let segments: Vec<_> = path.path.segments.iter().collect();
    let Some(last) = segments.last() else {
        return false;
    };
    let prefix_ok = match segments.len() {
        1 => true,
        3 => {
            matches!(segments[0].ident.to_string().as_str(), "std" | "alloc")
                && segments[1].ident == "vec"
                && segments[..2].iter().all(|s| s.arguments.is_none())
        }
        _ => false,
    };
    if !prefix_ok || last.ident != "Vec" {
        return false;
    }
    let syn::PathArguments::AngleBracketed(args) = &last.arguments else {
        return false;
    };
    matches!(
        args.args.iter().collect::<Vec<_>>().as_slice(),
        [syn::GenericArgument::Type(syn::Type::Path(inner))]
            if inner.qself.is_none() && inner.path.is_ident("u8")
    )
}

fn server(service: &Service) -> TokenStream {
    let Service {
        vis, ident, name, ..
    } = service;
    let p = private(service);
    let server = service_ident(service);
    let doc = format!(
        "Server dispatch of the [`{ident}`] service: add it to a server with \
         `Server::add_service({server}::new(implementation))`."
    );
    // The dispatch's own variables, hygienic: an argument of the user's named `into`,
    // `inner` or `ctx` does not shadow them.
    let into = Ident::new("into", Span::mixed_site());
    let inner = Ident::new("inner", Span::mixed_site());
    let ctx = Ident::new("ctx", Span::mixed_site());
    let arms = service.methods.iter().map(|m| {
        let Method { cfgs, ident: method, args, .. } = m;
        let wire_method = &m.name;
        let names: Vec<_> = args.iter().map(|(name, _)| name).collect();
        let types = args.iter().map(|(_, ty)| {
            if is_byte_vec(ty) { quote!(#p::ByteVec) } else { quote!(#ty) }
        });
        let unwrap = args
            .iter()
            .filter(|(_, ty)| is_byte_vec(ty))
            .map(|(name, _)| quote!(let #name = #name.0;));
        let context = m.context.as_ref().map(|c| if c.by_ref { quote!(&#ctx,) } else { quote!(#ctx,) });
        let encode = if is_byte_vec(&m.output) {
            quote!(<F as #p::Format>::encode_small(&#p::AsBytes(&ret)))
        } else {
            quote!(<F as #p::Format>::encode_small(&ret))
        };
        quote! {
            #(#cfgs)*
            #wire_method => {
                let (#(#names,)*): (#(#types,)*) = match <F as #p::Format>::decode(&payload) {
                    ::core::result::Result::Ok(args) => args,
                    ::core::result::Result::Err(e) => return #into.put_error(#p::ServiceError::bad_request(e)),
                };
                #(#unwrap)*
                // This copy's own pointer (see `local_copy`).
                let #inner = <::std::sync::Arc<::std::sync::Arc<S>> as ::core::clone::Clone>::clone(&self.inner);
                #into.put(async move {
                    let ret = <S as #ident>::#method(&**#inner, #context #(#names),*).await;
                    #encode.map_err(#p::ServiceError::encode)
                })
            }
        }
    });
    let listed = service.methods.iter().map(|m| {
        let cfgs = &m.cfgs;
        let wire_method = &m.name;
        quote!(#(#cfgs)* #wire_method,)
    });
    let paths = service.methods.iter().map(|m| {
        let cfgs = &m.cfgs;
        let wire_method = &m.name;
        quote!(#(#cfgs)* ::core::concat!(#name, ".", #wire_method),)
    });
    quote! {
        #[doc = #doc]
        #vis struct #server<S, F = #p::Bincode> {
            // The implementation, behind a pointer that each call's future clones: a
            // clone, and so a connection's copy (`local_copy`), has a pointer of its own.
            inner: ::std::sync::Arc<::std::sync::Arc<S>>,
            format: ::core::marker::PhantomData<fn() -> F>,
        }

        impl<S: #ident> #server<S> {
            /// Serves `service` with bincode payloads.
            pub fn new(service: S) -> Self {
                Self::with_format(service)
            }
        }

        impl<S: #ident, F: #p::Format> #server<S, F> {
            /// Serves `service` with payloads in format `F`.
            pub fn with_format(service: S) -> Self {
                Self::from_arc(::std::sync::Arc::new(service))
            }

            /// Serves a shared `service`.
            pub fn from_arc(service: ::std::sync::Arc<S>) -> Self {
                #server { inner: ::std::sync::Arc::new(service), format: ::core::marker::PhantomData }
            }
        }

        /// A clone shares the implementation behind a pointer of its own (see
        /// `Service::local_copy`): serving the clones on several connections, servers or
        /// bus instances does not make their calls write one shared count.
        impl<S, F> ::core::clone::Clone for #server<S, F> {
            fn clone(&self) -> Self {
                let inner = <::std::sync::Arc<S> as ::core::clone::Clone>::clone(&*self.inner);
                #server { inner: ::std::sync::Arc::new(inner), format: ::core::marker::PhantomData }
            }
        }

        impl<S, F> ::core::fmt::Debug for #server<S, F> {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                f.write_str(::core::stringify!(#server))
            }
        }

        impl<S: #ident, F: #p::Format> #p::Service for #server<S, F> {
            fn name(&self) -> &'static str {
                #name
            }

            fn call(
                &self,
                method: &str,
                ctx: #p::CallContext,
                payload: #p::bytes::Bytes,
            ) -> #p::CallFuture {
                let mut #into = #p::CallBox::new();
                #p::Service::call_in(self, method, ctx, payload, &mut #into);
                #p::CallBox::into_call_future(#into)
            }

            fn call_in(
                &self,
                method: &str,
                #ctx: #p::CallContext,
                payload: #p::bytes::Bytes,
                #into: &mut #p::CallBox,
            ) {
                let _ = &#ctx;
                match method {
                    #(#arms)*
                    _ => #into.put_error(#p::ServiceError::unknown_method(#name, method)),
                }
            }

            fn methods(&self) -> &'static [&'static str] {
                &[#(#listed)*]
            }

            fn method_paths(&self) -> &'static [&'static str] {
                &[#(#paths)*]
            }

            fn local_copy(&self) -> ::core::option::Option<::std::boxed::Box<dyn #p::Service>> {
                ::core::option::Option::Some(::std::boxed::Box::new(::core::clone::Clone::clone(self)))
            }
        }
    }
}

/// One check per argument and return type, spanned on the type, so that a type serde
/// cannot carry is reported where it was written.
fn wire_type_checks(service: &Service) -> TokenStream {
    let p = private(service);
    let checks = service.methods.iter().flat_map(|m| {
        let cfgs = m.cfgs.clone();
        let p = p.clone();
        m.args
            .iter()
            .map(|(_, ty)| ty)
            .chain([&m.output])
            .map(move |ty| {
                let check = quote_spanned!(ty.span()=> #p::assert_wire_type::<#ty>(););
                quote!(#(#cfgs)* { #check })
            })
    });
    quote! {
        const _: () = {
            #[allow(dead_code)]
            fn wire_type_checks() {
                #(#checks)*
            }
        };
    }
}
