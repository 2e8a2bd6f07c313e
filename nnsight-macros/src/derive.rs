//! `#[derive(ModuleTree)]`: lists a model struct's hooked children, so the model can print its
//! module tree and be walked by path.
//!
//! The struct itself is the typed tree that `trace!` resolves module paths against (rustc checks
//! `model.encoder.layer[3]` as field accesses); the derive adds the walk over its `Hooked`
//! fields and enforces the naming rule: a module field may not be called `output`, `input` or
//! `inputs`, because those words mean hook points in `trace!` (name it `output_`).

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Fields, Type};

pub fn derive(input: &DeriveInput) -> syn::Result<TokenStream> {
    let krate = crate_path(input)?;
    let Data::Struct(data) = &input.data else {
        return Err(syn::Error::new_spanned(&input.ident, "`ModuleTree` can be derived for structs only"));
    };
    let mut visits = Vec::new();
    let mut errors = Vec::new();
    for (i, field) in data.fields.iter().enumerate() {
        if skipped(field)? || !mentions_hooked(&field.ty) {
            continue;
        }
        let access = match &field.ident {
            Some(id) => {
                let name = id.to_string();
                if ["output", "input", "inputs"].contains(&name.as_str()) {
                    errors.push(syn::Error::new(
                        id.span(),
                        format!("a module field cannot be named `{name}`: in `trace!`, `.{name}` is the hook point; name the field `{name}_` (its module path keeps the checkpoint name)"),
                    ));
                    continue;
                }
                quote!(#id)
            }
            None => {
                let idx = syn::Index::from(i);
                quote!(#idx)
            }
        };
        visits.push(quote_spanned!(field.ty.span()=> #krate::ModuleTree::visit_modules(&self.#access, f);));
    }
    if let Some(mut e) = errors.pop() {
        for other in errors {
            e.combine(other);
        }
        return Err(e);
    }
    if matches!(data.fields, Fields::Unit) {
        visits.clear();
    }
    let name = &input.ident;
    let (impl_g, ty_g, where_g) = input.generics.split_for_impl();
    Ok(quote! {
        impl #impl_g #krate::ModuleTree for #name #ty_g #where_g {
            fn visit_modules(&self, f: &mut dyn ::core::ops::FnMut(&str, &'static str)) {
                #(#visits)*
            }
        }
    })
}

/// `#[module(crate = "path")]` on the struct (default `::nnsight`).
fn crate_path(input: &DeriveInput) -> syn::Result<TokenStream> {
    let mut krate = quote!(::nnsight);
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("module")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("crate") {
                let s: syn::LitStr = meta.value()?.parse()?;
                krate = s.parse::<syn::Path>()?.to_token_stream_owned();
                Ok(())
            } else {
                Err(meta.error("expected `crate = \"path\"`"))
            }
        })?;
    }
    Ok(krate)
}

/// `#[module(skip)]` on a field.
fn skipped(field: &syn::Field) -> syn::Result<bool> {
    let mut skip = false;
    for attr in field.attrs.iter().filter(|a| a.path().is_ident("module")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("skip") {
                skip = true;
                Ok(())
            } else {
                Err(meta.error("expected `skip`"))
            }
        })?;
    }
    Ok(skip)
}

/// True for `Hooked<..>`, `Vec<Hooked<..>>`, `Option<Hooked<..>>` and the like.
fn mentions_hooked(ty: &Type) -> bool {
    quote!(#ty).to_string().split(|c: char| !c.is_alphanumeric() && c != '_').any(|w| w == "Hooked")
}

trait OwnedTokens {
    fn to_token_stream_owned(&self) -> TokenStream;
}
impl OwnedTokens for syn::Path {
    fn to_token_stream_owned(&self) -> TokenStream {
        quote!(#self)
    }
}
