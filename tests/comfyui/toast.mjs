// Queues an API-format prompt from the real ComfyUI frontend (headless Debian Chromium driven
// by playwright-core), so the server's messages for that prompt reach this page, and reports
// the warning toasts the page shows while it runs.
//
// Usage: node toast.mjs URL PROMPT.json SCREENSHOT.png   (prints one JSON document)
import { chromium } from 'playwright-core';
import { readFileSync } from 'node:fs';

const [url, promptFile, shot] = process.argv.slice(2);
const prompt = JSON.parse(readFileSync(promptFile, 'utf8'));
const browser = await chromium.launch({
  executablePath: process.env.QWENCLIP_CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const out = { toasts: [], page_errors: [], queued: null };
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  page.on('pageerror', (e) => out.page_errors.push(String(e)));
  await page.goto(url);
  await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph
    && Object.keys(window.LiteGraph.registered_node_types).length > 100, null, { timeout: 120000 });
  out.queued = await page.evaluate(async (p) => {
    const { api } = await import('/scripts/api.js');
    // The server addresses a prompt's messages to the socket that queued it: wait for ours.
    for (let i = 0; i < 600 && !(api.clientId && api.socket && api.socket.readyState === 1); i++) {
      await new Promise((r) => setTimeout(r, 100));
    }
    const r = await api.queuePrompt(0, { output: p, workflow: {} });
    return r && r.prompt_id ? r.prompt_id : JSON.stringify(r);
  }, prompt);
  await page.waitForSelector('.p-toast-message', { timeout: 120000 });
  await page.waitForTimeout(500);
  out.toasts = await page.$$eval('.p-toast-message', (els) => els.map((e) => e.innerText));
  await page.screenshot({ path: shot });
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
