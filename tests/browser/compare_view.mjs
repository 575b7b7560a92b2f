// Drives the real ComfyUI frontend in headless Chromium: loads the bundled compare workflow with
// the tiny models, queues it, waits for FluxQCompareGrid, then checks the A/B compare view in the
// classic canvas and in the Vue node renderer (two images, the slider moves, picking, side by side).
//
//   node compare_view.mjs SERVER_URL WORKFLOW_JSON MODEL_MAP_JSON ARTIFACT_DIR
import { mkdtempSync, readFileSync, rmSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [serverUrl, workflowPath, modelMapPath, artifactDir] = process.argv.slice(2);
if (!artifactDir) {
  console.error("usage: node compare_view.mjs SERVER_URL WORKFLOW_JSON MODEL_MAP_JSON ARTIFACT_DIR");
  process.exit(2);
}
const RUN_TIMEOUT_MS = Number(process.env.FLUXQ_BROWSER_RUN_TIMEOUT_MS ?? 480_000);
const CHROMIUM = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";
const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
  "--disable-component-update", "--disable-sync", "--disable-quic"];

const workflow = JSON.parse(readFileSync(workflowPath, "utf8"));
const modelMap = JSON.parse(readFileSync(modelMapPath, "utf8"));
// The workflow as it reads with the tiny models' files. Substituted before loading: newer frontends
// (1.49.6) check model file names on load and mark a node naming a missing file as an error; a value
// assigned after loading does not clear that (a user's pick in the combo does).
for (const node of workflow.nodes) {
  if (Array.isArray(node.widgets_values)) {
    node.widgets_values = node.widgets_values.map((value) => (Object.hasOwn(modelMap, value) ? modelMap[value] : value));
  }
}
mkdirSync(artifactDir, { recursive: true });

function check(condition, message) {
  if (!condition) throw new Error(`assertion failed: ${message}`);
  console.log(`ok - ${message}`);
}

// Settings the frontend would otherwise greet a new user with (template browser, tours).
async function quietFirstRun() {
  for (const [id, value] of [["Comfy.TutorialCompleted", true], ["Comfy.VueNodes.Enabled", false]]) {
    await fetch(`${serverUrl}/api/settings/${id}`, { method: "POST", body: JSON.stringify(value) });
  }
}

async function viewState(page) {
  return page.evaluate(() => {
    const root = document.querySelector(".fluxq-compare");
    const stage = root?.querySelector(".fluxq-stage");
    const images = [...(stage?.querySelectorAll("img") ?? [])];
    const box = (el) => { const r = el.getBoundingClientRect(); return { x: r.x, y: r.y, width: r.width, height: r.height }; };
    return {
      mode: stage?.dataset.mode,
      images: images.map((img) => ({ slot: img.dataset.slot, loaded: img.complete && img.naturalWidth > 0,
        visible: img.getBoundingClientRect().width > 0, src: img.src, box: box(img) })),
      clip: stage?.querySelector('img[data-slot="A"]')?.style.clipPath ?? null,
      handleLeft: stage?.querySelector(".fluxq-handle")?.style.left ?? null,
      range: stage?.querySelector(".fluxq-range") ? box(stage.querySelector(".fluxq-range")) : null,
      a: root?.querySelector('[data-role="cell-a"]')?.value,
      b: root?.querySelector('[data-role="cell-b"]')?.value,
      thumbs: root?.querySelectorAll(".fluxq-thumb").length ?? 0,
    };
  });
}

// The error state both renderers draw (red frame, "Error" badge) from node.has_errors: validation
// and execution errors and, in newer frontends, missing model files.
async function checkNoNodeInError(page, where) {
  const inError = await page.evaluate(
    () => window.comfyAPI.app.app.graph.nodes.filter((n) => n.has_errors).map((n) => `${n.id} ${n.type}`));
  check(inError.length === 0, `${where}no node is in an error state [${inError.join(", ")}]`);
}

// The prompt's history entry once the server has finished it. Read from the server rather than
// awaited as the page's execution_success event: on a loaded machine the page once never saw that
// event although the run had finished (frontend 1.49.6).
async function finishedRun(promptId) {
  for (const deadline = Date.now() + RUN_TIMEOUT_MS; Date.now() < deadline;) {
    const entry = (await (await fetch(`${serverUrl}/history/${promptId}`)).json())[promptId];
    if (entry?.status?.completed !== undefined) return entry;
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
  throw new Error(`the workflow did not finish within ${RUN_TIMEOUT_MS / 1000} s`);
}

async function waitForLoadedImages(page, count) {
  await page.waitForFunction((n) => {
    const images = [...document.querySelectorAll(".fluxq-compare .fluxq-stage img")];
    return images.length === n && images.every((img) => img.complete && img.naturalWidth > 0);
  }, count, { timeout: 30_000 });
}

// The slider's box once it has stopped moving: the canvas re-lays the node out while its images
// settle, and a drag aimed at a box that then moves lands beside the slider (seen once on 0.33.0).
async function settledRange(page) {
  let previous = null;
  for (let tries = 0; tries < 50; tries += 1) {
    const { range } = await viewState(page);
    if (previous && JSON.stringify(range) === JSON.stringify(previous)) return range;
    previous = range;
    await page.waitForTimeout(100);
  }
  throw new Error(`the slider never stopped moving (${JSON.stringify(previous)})`);
}

async function dragSlider(page, fromFraction, toFraction) {
  const range = await settledRange(page);
  const y = range.y + range.height / 2;
  await page.mouse.move(range.x + range.width * fromFraction, y);
  await page.mouse.down();
  await page.mouse.move(range.x + range.width * toFraction, y, { steps: 8 });
  await page.mouse.up();
  return viewState(page);
}

const userDataDir = mkdtempSync(join(tmpdir(), "fluxq-chromium-"));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: CHROMIUM, headless: true, args: FLAGS, viewport: { width: 1400, height: 1000 },
});
const page = context.pages()[0] ?? await context.newPage();
page.on("console", (msg) => { if (msg.type() === "error") console.log(`[browser] ${msg.text()}`); });
page.on("pageerror", (error) => console.log(`[page error] ${error.message}`));

try {
  await quietFirstRun();
  await page.goto(serverUrl, { waitUntil: "domcontentloaded", timeout: 120_000 });
  // Node types are registered after the graph exists (a workflow loaded earlier gets placeholder
  // nodes), and the frontend then loads its own start-up graph, which would replace one loaded before.
  await page.waitForFunction(() => window.LiteGraph?.registered_node_types?.FluxQCompareGrid
    && window.comfyAPI?.app?.app?.graph?.nodes?.length > 0, null, { timeout: 120_000 });
  const extensions = await page.evaluate(() => window.comfyAPI.app.app.extensions.map((e) => e.name));
  check(extensions.includes("FluxQLoraLab.CompareView"), "the pack's extension is registered");

  // The bundled workflow with the tiny models and a small, quick grid (2 strengths x 1 seed, 64 px).
  const gridId = await page.evaluate(async ({ workflow }) => {
    const { app } = window.comfyAPI.app;
    const { api } = window.comfyAPI.api;
    await app.loadGraphData(workflow);
    // As a user's edit arrives: through the widget, so its callback and the node's change hooks run.
    const set = (node, name, value) => node.widgets.find((w) => w.name === name).setValue(value, { node, canvas: app.canvas });
    const settings = app.graph.nodes.find((n) => n.type === "FluxQSamplerSettings");
    Object.entries({ preset: "custom", steps: 2, width: 64, height: 64 }).forEach(([k, v]) => set(settings, k, v));
    const grid = app.graph.nodes.find((n) => n.type === "FluxQCompareGrid");
    set(grid, "strengths", "0, 1");
    set(grid, "seeds", "0");
    window.__fluxqPromptId = null;
    api.addEventListener("execution_start", ({ detail }) => { window.__fluxqPromptId = detail.prompt_id; });
    return String(grid.id);
  }, { workflow });

  // app.queuePrompt's return value is unreliable in 1.32.9 (`!{}` for "no node errors"): watch the
  // execution start instead, and show the error dialog's text if validation refused the prompt.
  await page.evaluate(() => window.comfyAPI.app.app.queuePrompt(0, 1));
  const started = await page.waitForFunction(() => window.__fluxqPromptId, null, { timeout: 30_000 }).catch(() => null);
  if (!started) {
    const dialog = await page.evaluate(() => document.querySelector(".p-dialog")?.innerText ?? "(no dialog)");
    check(false, `the workflow was queued: ${dialog}`);
  }
  const run = await finishedRun(await started.jsonValue());
  const errors = run.status.messages.filter(([type]) => type === "execution_error").map(([, detail]) => detail.exception_message);
  check(run.status.status_str === "success" && errors.length === 0, `the workflow ran without errors ${JSON.stringify(errors)}`);
  await checkNoNodeInError(page, "");

  // Bring the grid node into view at zoom 1 with room for the view.
  await page.evaluate((id) => {
    const { app } = window.comfyAPI.app;
    const node = app.graph.getNodeById(Number(id));
    node.setSize([node.size[0], Math.max(node.size[1], 860)]);
    app.canvas.ds.scale = 1;
    app.canvas.ds.offset = [-node.pos[0] + 120, -node.pos[1] + 110];
    app.canvas.setDirty(true, true);
  }, gridId);
  await waitForLoadedImages(page, 2);

  let state = await viewState(page);
  check(state.mode === "slider", "the view opens in slider mode");
  check(state.images.length === 2 && state.images.every((i) => i.loaded && i.visible), "two cell images are shown");
  check(state.images[0].src !== state.images[1].src, "A and B are different cells");
  check(state.thumbs === 2, "the picker lists every cell");

  const before = state.handleLeft;
  state = await dragSlider(page, 0.5, 0.85);
  check(state.handleLeft !== before && parseFloat(state.handleLeft) > 75, `the slider moves (${before} -> ${state.handleLeft})`);
  check(/inset\(0(px)? 1[0-9]/.test(state.clip), `image A is clipped at the handle (${state.clip})`);
  await page.screenshot({ path: join(artifactDir, "compare_view_classic.png") });

  // Pick by clicking the thumbnails: first click sets A, the next sets B.
  await page.locator('.fluxq-thumb[data-index="1"]').click();
  await page.locator('.fluxq-thumb[data-index="0"]').click();
  state = await viewState(page);
  check(state.a === "1" && state.b === "0", "clicking cells picks A then B");

  await page.locator('.fluxq-compare [data-role="mode"]').selectOption("side");
  await waitForLoadedImages(page, 2);
  state = await viewState(page);
  check(state.mode === "side" && state.images[0].box.x + state.images[0].box.width <= state.images[1].box.x + 1,
    "side by side shows the two cells next to each other");

  const history = await page.evaluate(async () => {
    const response = await window.comfyAPI.api.api.fetchApi("/history?max_items=1");
    return Object.values(await response.json())[0];
  });
  const saved = Object.values(history.outputs).flatMap((o) => o.images ?? []).filter((i) => i.type === "output");
  check(saved.some((i) => i.filename.endsWith(".png")), `the workflow saved the grid PNG (${saved.map((i) => i.filename)})`);

  // The same view in the Vue node renderer ("Nodes 2.0").
  await page.evaluate(() => window.comfyAPI.app.app.extensionManager.setting.set("Comfy.VueNodes.Enabled", true));
  await page.waitForFunction(() => document.querySelector("[data-node-id] .fluxq-compare"), null, { timeout: 30_000 });
  await page.locator('[data-node-id] .fluxq-compare [data-role="mode"]').selectOption("slider");
  await waitForLoadedImages(page, 2);
  state = await viewState(page);
  check(state.images.length === 2 && state.images.every((i) => i.loaded && i.visible), "Vue nodes: two cell images are shown");
  const vueBefore = state.handleLeft;
  state = await dragSlider(page, 0.5, 0.2);
  check(state.handleLeft !== vueBefore && parseFloat(state.handleLeft) < 30, `Vue nodes: the slider moves (${vueBefore} -> ${state.handleLeft})`);
  await checkNoNodeInError(page, "Vue nodes: ");
  await page.screenshot({ path: join(artifactDir, "compare_view_vue_nodes.png") });
  console.log("PASS");
} catch (error) {
  await page.screenshot({ path: join(artifactDir, "compare_view_failure.png") }).catch(() => {});
  console.error(error.stack ?? String(error));
  process.exitCode = 1;
} finally {
  await context.close();
  rmSync(userDataDir, { recursive: true, force: true });
}
