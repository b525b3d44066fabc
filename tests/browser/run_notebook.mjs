// Open a notebook in JupyterLab in headless Chromium, run every cell from the Run menu, wait until the
// kernel is idle and every code cell has run, then report what a student sees (as JSON on stdout) and
// keep a screenshot. Used by tests/test_browser.py; Chromium is Debian's, driven by playwright-core.
//
//   node run_notebook.mjs --url http://127.0.0.1:PORT/lab/tree/notebooks/01_data.ipynb?token=T \
//        --screenshot out.png [--timeout 150] [--chromium /usr/bin/chromium]
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

function option(name, fallback) {
  const at = process.argv.indexOf(`--${name}`);
  return at > 0 ? process.argv[at + 1] : fallback;
}

const url = option("url");
const screenshot = option("screenshot");
const timeoutMs = Number(option("timeout", "150")) * 1000;
const executablePath = option("chromium", process.env.CHROMIUM || "/usr/bin/chromium");
if (!url || !screenshot) {
  console.error("usage: node run_notebook.mjs --url URL --screenshot FILE [--timeout S] [--chromium PATH]");
  process.exit(2);
}

const started = Date.now();
const left = () => Math.max(1000, timeoutMs - (Date.now() - started));
const profile = mkdtempSync(join(tmpdir(), "spleenkit-chromium-"));
// as root, with no network but loopback: no sandbox, no GPU, and none of Chromium's own traffic
const context = await chromium.launchPersistentContext(profile, {
  executablePath,
  headless: true,
  viewport: { width: 1400, height: 900 },
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"],  // and no name look-ups either
});
const report = { url: url.replace(/token=[^&]+/, "token=..."), steps: [], console_errors: [], dialogs: [],
                 blocked: [] };
const step = (name) => report.steps.push({ name, seconds: (Date.now() - started) / 1000 });
const server = new URL(url);
// nothing leaves this machine: requests to any other host (the badges' images) are refused in the browser
await context.route("**/*", (route) => {
  const target = new URL(route.request().url());
  if (target.host === server.host || ["data:", "blob:"].includes(target.protocol)) return route.continue();
  report.blocked.push(`${target.protocol}//${target.host}`);
  return route.abort();
});
try {
  const page = context.pages()[0] || (await context.newPage());
  page.on("console", (message) => {
    if (message.type() === "error") report.console_errors.push(message.text().slice(0, 300));
  });
  await page.goto(url, { timeout: left() });
  await page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell").first().waitFor({ timeout: left() });
  // a student answers a dialog (JupyterLab may ask which kernel to start) with its default button
  async function answerDialogs() {
    const dialog = page.locator(".jp-Dialog");
    if (!(await dialog.isVisible().catch(() => false))) return false;
    report.dialogs.push((await dialog.locator(".jp-Dialog-header").innerText().catch(() => "?")).trim());
    await dialog.locator(".jp-Dialog-button.jp-mod-accept").click();
    await dialog.waitFor({ state: "detached", timeout: left() });
    return true;
  }
  async function until(what, predicate) {
    while (Date.now() - started < timeoutMs) {
      if (await answerDialogs()) continue;
      if (await page.evaluate(predicate)) return step(what);
      await page.waitForTimeout(500);
    }
    throw new Error(`timed out after ${timeoutMs / 1000} s waiting for: ${what}`);
  }
  // the kernel is ready when the status bar says "<kernel> | Idle" (the toolbar's execution indicator
  // also says idle while the status bar still reads "No Kernel | Initializing")
  await until("notebook open, kernel idle", () => [...document.querySelectorAll(".jp-StatusBar-TextItem")]
    .some((item) => /\| Idle$/.test(item.textContent.trim()) && !item.textContent.startsWith("No Kernel")));

  // Run > Run All Cells, as a student does
  await page.locator(".lm-MenuBar-itemLabel", { hasText: /^Run$/ }).click();
  await page.locator(".lm-Menu-itemLabel", { hasText: /^Run All Cells$/ }).click();
  step("Run All Cells clicked");

  // done when the kernel is idle again and every code cell shows an execution count ([12]:), or a cell
  // failed (Run All stops there; the report shows it)
  await until("all cells run (or one failed), kernel idle", () => {
    const prompts = [...document.querySelectorAll(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputArea-prompt")];
    const indicator = document.querySelector(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator");
    const failed = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) [data-mime-type="application/vnd.jupyter.stderr"]')]
      .some((e) => e.textContent.includes("Traceback"));
    return indicator !== null && indicator.getAttribute("data-status") === "idle"
      && (failed || (prompts.length > 0 && prompts.every((p) => /\[\d+\]/.test(p.textContent))));
  });

  Object.assign(report, await page.evaluate(() => {
    const cells = [...document.querySelectorAll(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell")];
    const outputs = [...document.querySelectorAll(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output")];
    const stderr = [...document.querySelectorAll('.jp-RenderedText[data-mime-type="application/vnd.jupyter.stderr"]')];
    return {
      code_cells: cells.length,
      prompts: cells.map((c) => c.querySelector(".jp-InputArea-prompt")?.textContent.trim()),
      images: [...document.querySelectorAll(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output img")]
        .map((img) => ({ width: img.naturalWidth, height: img.naturalHeight, complete: img.complete })),
      stderr: stderr.map((e) => e.innerText.slice(0, 2000)),
      texts: outputs.map((o) => o.innerText.slice(0, 500)),
    };
  }));

  // the picture: the three-plane figure with the cell that drew it
  const figure = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output img").first();
  if (await figure.count()) {
    await figure.evaluate((img) => img.closest(".jp-Cell").scrollIntoView({ block: "center" }));
  }
  await page.waitForTimeout(300);
  await page.screenshot({ path: screenshot });
  step("screenshot taken");
} catch (error) {
  report.error = String(error && error.stack ? error.stack : error).slice(0, 3000);
  try {
    await context.pages()[0].screenshot({ path: screenshot });
  } catch {}
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(report));
process.exit(report.error ? 1 : 0);
