// Tensor backward hooks and retain_grad for nnsight-runtime (tch exposes neither).
//
// Built by nnsight-runtime's build.rs against libtorch's headers. Every `at::Tensor*` here is
// the pointer a `tch::Tensor` wraps (`C_tensor` in torch-sys is `torch::Tensor`, i.e. at::Tensor).
// No C++ exception leaves this file: each entry point catches and hands back a message that the
// caller frees with nnsight_hooks_free_error. Rust code is reached only through the function
// pointers passed in, which never unwind (they catch panics on the Rust side).
#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <new>

namespace {

using Call = at::Tensor *(*)(void *state, at::Tensor *grad);
using Drop = void (*)(void *state);
using WeakTensor = c10::weak_intrusive_ptr<at::TensorImpl, at::UndefinedTensorImpl>;

char *copy_message(const char *msg) {
  size_t n = std::strlen(msg);
  char *out = static_cast<char *>(std::malloc(n + 1));
  if (out != nullptr) std::memcpy(out, msg, n + 1);
  return out;
}

template <typename F>
int guarded(char **err, F &&f) {
  try {
    f();
    return 0;
  } catch (const c10::Error &e) {
    *err = copy_message(e.what_without_backtrace());
  } catch (const std::exception &e) {
    *err = copy_message(e.what());
  } catch (...) {
    *err = copy_message("unknown C++ exception");
  }
  return 1;
}

}  // namespace

extern "C" {

// Registers a hook on `t` that calls `call(state, grad)`. `grad` is a new heap at::Tensor that
// the callee owns; the callee returns null to keep the gradient or a heap at::Tensor (whose
// ownership passes here) to replace it. Ownership of `state` passes here in all cases: `drop`
// runs exactly once, when libtorch destroys the hook (remove_hook, or the tensor's autograd
// metadata and graph being freed), or right away if registering fails.
// On success stores the hook index in *pos and a weak reference to the tensor in *weak.
int nnsight_hooks_register(const at::Tensor *t, void *state, Call call, Drop drop,
                           unsigned *pos, void **weak, char **err) {
  std::shared_ptr<void> owner;
  try {
    owner = std::shared_ptr<void>(state, drop);  // calls drop(state) itself if it throws
  } catch (...) {
    *err = copy_message("out of memory while registering a gradient hook");
    return 1;
  }
  return guarded(err, [&] {
    auto hook = [owner = std::move(owner), call](const at::Tensor &grad) -> at::Tensor {
      // Keeps the state alive even if the hook is removed from inside the call.
      std::shared_ptr<void> keep = owner;
      at::Tensor *replacement = call(keep.get(), new at::Tensor(grad));
      if (replacement == nullptr) return at::Tensor();
      at::Tensor out = std::move(*replacement);
      delete replacement;
      return out;
    };
    auto weak_ref = std::make_unique<WeakTensor>(t->getIntrusivePtr());
    *pos = t->register_hook(std::move(hook));
    *weak = weak_ref.release();
  });
}

// Removes hook `pos` from the tensor behind `weak`, if that tensor is still alive (sets
// *removed to 1 then, else 0). Does not free `weak`.
int nnsight_hooks_remove(void *weak, unsigned pos, int *removed, char **err) {
  *removed = 0;
  return guarded(err, [&] {
    auto strong = static_cast<WeakTensor *>(weak)->lock();
    if (!strong.defined()) return;
    at::Tensor t(std::move(strong));
    t.remove_hook(pos);
    *removed = 1;
  });
}

void nnsight_hooks_free_weak(void *weak) { delete static_cast<WeakTensor *>(weak); }

int nnsight_hooks_retain_grad(const at::Tensor *t, char **err) {
  return guarded(err, [&] { t->retain_grad(); });
}

int nnsight_hooks_retains_grad(const at::Tensor *t, int *out, char **err) {
  return guarded(err, [&] { *out = t->retains_grad() ? 1 : 0; });
}

void nnsight_hooks_free_error(char *err) { std::free(err); }

}  // extern "C"
