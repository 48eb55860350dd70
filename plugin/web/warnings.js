// Shows the pack's warnings (e.g. a prompt cut at the token limit) as a toast in the
// frontend; the server log has them too (plugin/nodes.py `warn`).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

app.registerExtension({
  name: "qwenclip.warnings",
  setup() {
    api.addEventListener("qwenclip.warning", ({ detail }) => {
      // The graph on screen is usually the one that ran: name the node as the user titled it.
      const node = detail.node != null ? app.graph?.getNodeById(Number(detail.node)) : null;
      const title = node && node.type === detail.type ? node.title : detail.title;
      const where = `${title} (#${detail.node})`;
      if (app.extensionManager?.toast) {
        app.extensionManager.toast.add({ severity: "warn", summary: where, detail: detail.message, life: 15000 });
      } else {
        console.warn(`${where}: ${detail.message}`);
      }
    });
  },
});
