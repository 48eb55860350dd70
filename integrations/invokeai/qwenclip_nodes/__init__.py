# InvokeAI imports this folder as a node pack (INVOKEAI_ROOT/nodes/qwenclip_nodes) and registers
# only the invocations imported here. The folder must not be named `qwenclip`: InvokeAI puts a
# node pack into sys.modules under its folder name, which would shadow the qwenclip package.
from .qwen_text_encode import QwenTextEncodeSDXLInvocation

__all__ = ["QwenTextEncodeSDXLInvocation"]
