// Loads UI-format workflows into the real ComfyUI frontend (headless Debian Chromium driven by
// playwright-core), and for each reports: node types the frontend does not know, widgets whose
// values did not load as saved (or a combo value that is not among its options), nodes that
// the saved view leaves off screen or under the frontend's bars, page errors while loading,
// the prompt the frontend makes (app.graphToPrompt) and the server's answer to it (POST
// /prompt from the page). Accepted prompts are deleted from the queue at once: the
// check is that the server accepts them; the end-to-end tests run them on tiny models.
//
// Usage: node browser.mjs URL SCREENSHOT_DIR WORKFLOW.json...   (prints one JSON document)
import { chromium } from 'playwright-core';
import { readFileSync } from 'node:fs';
import { basename, join } from 'node:path';

const [url, shots, ...files] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.QWENCLIP_CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const results = [];
// A user who has seen the template browser once (it opens over everything on a first visit).
await fetch(`${url}/settings/Comfy.TutorialCompleted`, { method: 'POST', body: 'true' });
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  let pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  await page.goto(url);
  await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph
    && Object.keys(window.LiteGraph.registered_node_types).length > 100, null, { timeout: 120000 });
  await page.waitForTimeout(1000);
  for (const file of files) {
    const workflow = JSON.parse(readFileSync(file, 'utf8'));
    pageErrors = [];
    const r = await page.evaluate(async (wf) => {
      const app = window.app;
      const LG = window.LiteGraph;
      const out = { missing: [], widget_errors: [], load_error: null };
      out.missing = [...new Set(wf.nodes.map((n) => n.type).filter((t) => !LG.registered_node_types[t]))];
      try {
        await app.loadGraphData(wf, true, true, 'test');
      } catch (e) {
        out.load_error = String(e && e.stack || e);
        return out;
      }
      const same = (a, b) => (typeof a === 'number' && typeof b === 'number') ? Math.abs(a - b) < 1e-9 : JSON.stringify(a) === JSON.stringify(b);
      for (const saved of wf.nodes) {
        const node = app.graph.getNodeById(saved.id);
        if (!node) { out.widget_errors.push(`node ${saved.id} (${saved.type}) did not load`); continue; }
        if (node.has_errors) out.widget_errors.push(`node ${saved.id} (${saved.type}) has errors`);
        const widgets = node.widgets || [];
        const values = widgets.map((w) => w.value);
        const want = saved.widgets_values || [];
        if (values.length !== want.length) {
          out.widget_errors.push(`node ${saved.id} (${saved.type}): ${values.length} widgets, the file has ${want.length} values`);
        }
        widgets.forEach((w, i) => {
          if (i < want.length && !same(w.value, want[i])) {
            out.widget_errors.push(`node ${saved.id} (${saved.type}) widget ${w.name}: ${JSON.stringify(w.value)} != saved ${JSON.stringify(want[i])}`);
          }
          const options = w.options && w.options.values;
          if (w.type === 'combo' && Array.isArray(options) && !options.includes(w.value)) {
            out.widget_errors.push(`node ${saved.id} (${saved.type}) combo ${w.name}: ${JSON.stringify(w.value)} is not an option`);
          }
        });
      }
      return out;
    }, workflow);
    // Dialogs the load opened (missing models), closed as a user would before looking.
    for (let i = 0; i < 5 && await page.$('.p-dialog-mask'); i++) {
      await page.keyboard.press('Escape');
      await page.waitForTimeout(400);
    }
    Object.assign(r, await page.evaluate(async () => {
      const app = window.app;
      const LG = window.LiteGraph;
      const out = {};
      // The saved view: every node on screen, clear of the side bar, top bars and controls.
      const canvasEl = app.canvas.canvas;
      const box = canvasEl.getBoundingClientRect();
      const W = window.innerWidth, H = window.innerHeight;
      const clear = (x, y) => document.elementFromPoint(x, y) === canvasEl;
      let left = 0; while (left < W && !clear(left, H / 2)) left++;
      let top = 0; while (top < H && !clear(W / 2, top)) top++;
      let right = W - 1; while (right > 0 && !clear(right, H / 2)) right--;
      let bottom = H - 1; while (bottom > 0 && !clear(W / 2, bottom)) bottom--;
      const ds = app.canvas.ds;
      const title = LG.NODE_TITLE_HEIGHT || 30;
      out.view = { left, top, right, bottom, scale: ds.scale };
      out.offscreen = [];
      for (const node of app.graph._nodes) {
        const x0 = box.left + (node.pos[0] + ds.offset[0]) * ds.scale;
        const y0 = box.top + (node.pos[1] - title + ds.offset[1]) * ds.scale;
        const x1 = box.left + (node.pos[0] + node.size[0] + ds.offset[0]) * ds.scale;
        const y1 = box.top + (node.pos[1] + node.size[1] + ds.offset[1]) * ds.scale;
        if (x0 < left || y0 < top || x1 > right || y1 > bottom) {
          out.offscreen.push(`${node.type} #${node.id} at [${Math.round(x0)}, ${Math.round(y0)}, ${Math.round(x1)}, ${Math.round(y1)}]`);
        }
      }
      const p = await app.graphToPrompt();
      out.prompt = p.output;
      const res = await fetch('/prompt', {
        method: 'POST', headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ prompt: p.output, client_id: 'qwenclip-browser-test', extra_data: { extra_pnginfo: { workflow: p.workflow } } }),
      });
      out.status = res.status;
      out.body = await res.json().catch(() => null);
      if (res.status === 200 && out.body && out.body.prompt_id) {
        await fetch('/queue', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ delete: [out.body.prompt_id] }) });
        await fetch('/interrupt', { method: 'POST' });
      }
      return out;
    }));
    r.file = basename(file);
    r.page_errors = pageErrors;
    if (shots) {
      await page.waitForTimeout(300);
      await page.screenshot({ path: join(shots, basename(file, '.json') + '.png') });
    }
    results.push(r);
  }
} finally {
  await browser.close();
}
console.log(JSON.stringify(results));
