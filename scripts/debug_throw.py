import torch
from torch.utils.cpp_extension import load_inline
src = r'''
#include <torch/extension.h>
void throw_int(int64_t v) { TORCH_CHECK(v < 0, "int message ", v); }
void throw_str(int64_t v) { TORCH_CHECK(v < 0, std::string("str message ") + std::to_string(v)); }
void throw_plain(int64_t v) { TORCH_CHECK(v < 0, "plain message"); }
void throw_type(const at::Tensor& t) { TORCH_CHECK(false, "type message ", t.scalar_type()); }
'''
m = load_inline("dbg_throw", cpp_sources=src, functions=["throw_int", "throw_str", "throw_plain", "throw_type"],
                extra_cflags=["-O3", "-std=c++17"], verbose=False)
import sys
case = sys.argv[1]
try:
    {"int": lambda: m.throw_int(5), "str": lambda: m.throw_str(5), "plain": lambda: m.throw_plain(5),
     "type": lambda: m.throw_type(torch.zeros(1))}[case]()
except RuntimeError as e:
    print(case, "ok:", str(e).splitlines()[0][:80])
