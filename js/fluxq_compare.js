// A/B compare view for FluxQCompareGrid: pick two cells (click the thumbnails or use the two
// dropdowns) and compare them with a draggable slider or side by side.
//
// The view is one DOM widget (node.addDOMWidget): the classic LiteGraph canvas overlays it on the
// node and the Vue node renderer ("Nodes 2.0") mounts the same element, so both renderers work.
// Data comes from the node's UI payload (`fluxq_cells`, `fluxq_grid`), delivered to onExecuted.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_ID = "FluxQCompareGrid";
const WIDGET_NAME = "fluxq_compare";
const EMPTY_HEIGHT = 48;
const VIEW_HEIGHT = 420;

const STYLE = `
.fluxq-compare { display: flex; flex-direction: column; gap: 6px; width: 100%; height: 100%;
  box-sizing: border-box; padding: 4px; font: 12px sans-serif; color: var(--input-text, #ddd);
  overflow: hidden; }
.fluxq-compare .fluxq-empty { opacity: 0.7; padding: 8px; }
.fluxq-compare .fluxq-toolbar { display: flex; flex-wrap: wrap; gap: 6px; align-items: center; }
.fluxq-compare select { background: var(--comfy-input-bg, #222); color: inherit; max-width: 40%;
  border: 1px solid var(--border-color, #555); border-radius: 4px; font: inherit; }
.fluxq-compare .fluxq-picker { display: grid; gap: 2px; overflow: auto; max-height: 30%; flex: none; }
.fluxq-compare .fluxq-picker .fluxq-label { opacity: 0.75; font-size: 11px; white-space: nowrap;
  overflow: hidden; text-overflow: ellipsis; align-self: center; }
.fluxq-compare .fluxq-thumb { position: relative; cursor: pointer; border: 2px solid transparent;
  border-radius: 3px; padding: 0; background: none; line-height: 0; }
.fluxq-compare .fluxq-thumb img { width: 100%; max-height: 64px; object-fit: contain; }
.fluxq-compare .fluxq-thumb[data-slot="A"] { border-color: #4aa3ff; }
.fluxq-compare .fluxq-thumb[data-slot="B"] { border-color: #ffa94a; }
.fluxq-compare .fluxq-thumb[data-slot]::after { content: attr(data-slot); position: absolute; top: 0; left: 0;
  font-size: 10px; line-height: 1; padding: 2px 3px; background: #000a; color: #fff; }
.fluxq-compare .fluxq-stage { position: relative; flex: 1; min-height: 120px; user-select: none; }
.fluxq-compare .fluxq-stage img { position: absolute; inset: 0; width: 100%; height: 100%;
  object-fit: contain; pointer-events: none; }
.fluxq-compare .fluxq-stage[data-mode="side"] { display: flex; gap: 4px; }
.fluxq-compare .fluxq-stage[data-mode="side"] img { position: static; flex: 1; min-width: 0; }
.fluxq-compare .fluxq-handle { position: absolute; top: 0; bottom: 0; width: 2px; margin-left: -1px;
  background: #fff; box-shadow: 0 0 3px #000; pointer-events: none; }
.fluxq-compare .fluxq-stage[data-mode="side"] .fluxq-handle,
.fluxq-compare .fluxq-stage[data-mode="side"] .fluxq-range { display: none; }
.fluxq-compare .fluxq-range { position: absolute; inset: 0; width: 100%; height: 100%; margin: 0;
  opacity: 0; cursor: ew-resize; }
.fluxq-compare .fluxq-caption { position: absolute; top: 2px; padding: 1px 4px; background: #000a;
  color: #fff; font-size: 11px; pointer-events: none; max-width: 48%; white-space: nowrap;
  overflow: hidden; text-overflow: ellipsis; }
.fluxq-compare .fluxq-caption[data-slot="A"] { left: 2px; }
.fluxq-compare .fluxq-caption[data-slot="B"] { right: 2px; }
`;

function injectStyle() {
  if (document.getElementById("fluxq-compare-style")) return;
  const style = document.createElement("style");
  style.id = "fluxq-compare-style";
  style.textContent = STYLE;
  document.head.appendChild(style);
}

function el(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) node.append(child);
  return node;
}

function cellUrl(cell) {
  const query = new URLSearchParams({ filename: cell.filename, subfolder: cell.subfolder ?? "", type: cell.type });
  return api.apiURL(`/view?${query}`);
}

// The view's state and DOM; one per node.
class CompareView {
  constructor() {
    this.cells = [];
    this.layout = null;
    this.a = 0;
    this.b = 0;
    this.nextSlot = "A";
    this.position = 50;
    this.mode = "slider";
    this.root = el("div", { className: "fluxq-compare" });
    // Keep drags on the slider from also dragging the node or panning the canvas.
    for (const type of ["pointerdown", "mousedown", "wheel"]) {
      this.root.addEventListener(type, (event) => event.stopPropagation());
    }
    this.render();
  }

  get hasData() {
    return this.cells.length > 0;
  }

  setData(cells, layout) {
    this.cells = cells;
    this.layout = layout;
    const previous = [this.a, this.b];
    // Default pair: the first cell (usually the baseline) against the last one.
    this.a = previous[0] < cells.length ? previous[0] : 0;
    this.b = previous[1] < cells.length && previous[1] !== this.a ? previous[1] : cells.length - 1;
    this.render();
  }

  pick(index) {
    if (this.nextSlot === "A") this.a = index;
    else this.b = index;
    this.nextSlot = this.nextSlot === "A" ? "B" : "A";
    this.render();
  }

  setPosition(percent) {
    this.position = Math.min(100, Math.max(0, percent));
    if (this.imageA) this.imageA.style.clipPath = `inset(0 ${100 - this.position}% 0 0)`;
    if (this.handle) this.handle.style.left = `${this.position}%`;
  }

  render() {
    this.imageA = this.handle = null;
    if (!this.hasData) {
      this.root.style.minHeight = "";
      this.root.replaceChildren(el("div", { className: "fluxq-empty",
        textContent: "Queue the grid: its cells appear here for an A/B comparison." }));
      return;
    }
    // The Vue node renderer sizes the widget from its content; the classic canvas from getMinHeight.
    this.root.style.minHeight = `${VIEW_HEIGHT}px`;
    this.root.replaceChildren(this.renderToolbar(), this.renderPicker(), this.renderStage());
    this.setPosition(this.position);
  }

  renderToolbar() {
    const options = () => this.cells.map((cell, index) => el("option", { value: String(index), textContent: cell.label }));
    const slotSelect = (slot) => {
      const select = el("select", { title: `Cell ${slot}` }, options());
      select.dataset.role = `cell-${slot.toLowerCase()}`;
      select.value = String(slot === "A" ? this.a : this.b);
      select.addEventListener("change", () => {
        if (slot === "A") this.a = Number(select.value);
        else this.b = Number(select.value);
        this.render();
      });
      return select;
    };
    const mode = el("select", { title: "Compare mode" }, [
      el("option", { value: "slider", textContent: "slider" }),
      el("option", { value: "side", textContent: "side by side" }),
    ]);
    mode.dataset.role = "mode";
    mode.value = this.mode;
    mode.addEventListener("change", () => {
      this.mode = mode.value;
      this.render();
    });
    return el("div", { className: "fluxq-toolbar" }, ["A", slotSelect("A"), "B", slotSelect("B"), mode]);
  }

  renderPicker() {
    const { rows, cols } = this.layout;
    const picker = el("div", { className: "fluxq-picker", title: "Click a cell to set A, then B" });
    picker.style.gridTemplateColumns = `minmax(40px, max-content) repeat(${cols.length}, minmax(32px, 72px))`;
    picker.append(el("span"), ...cols.map((label) => el("span", { className: "fluxq-label", textContent: label })));
    rows.forEach((rowLabel, row) => {
      picker.append(el("span", { className: "fluxq-label", textContent: rowLabel, title: rowLabel }));
      cols.forEach((_, col) => {
        const index = this.cells.findIndex((cell) => cell.row === row && cell.col === col);
        const thumb = el("button", { className: "fluxq-thumb", title: this.cells[index].label },
          [el("img", { src: cellUrl(this.cells[index]), alt: this.cells[index].label })]);
        thumb.dataset.index = String(index);
        if (index === this.a) thumb.dataset.slot = "A";
        else if (index === this.b) thumb.dataset.slot = "B";
        thumb.addEventListener("click", () => this.pick(index));
        picker.append(thumb);
      });
    });
    return picker;
  }

  renderStage() {
    const [cellA, cellB] = [this.cells[this.a], this.cells[this.b]];
    const stage = el("div", { className: "fluxq-stage" });
    stage.dataset.mode = this.mode;
    const imageB = el("img", { src: cellUrl(cellB), alt: `B: ${cellB.label}` });
    const imageA = el("img", { src: cellUrl(cellA), alt: `A: ${cellA.label}` });
    imageA.dataset.slot = "A";
    imageB.dataset.slot = "B";
    const captions = [["A", cellA], ["B", cellB]].map(([slot, cell]) => {
      const caption = el("div", { className: "fluxq-caption", textContent: `${slot}: ${cell.label}` });
      caption.dataset.slot = slot;
      return caption;
    });
    if (this.mode === "side") {
      stage.append(imageA, imageB, ...captions);
      return stage;
    }
    // Slider: B underneath, A on top clipped to the left of the handle; a transparent range input
    // covers the stage, so dragging anywhere on it (or the arrow keys) moves the split.
    const range = el("input", { type: "range", min: "0", max: "100", step: "0.1", className: "fluxq-range",
      value: String(this.position), title: "Drag to move the split" });
    range.addEventListener("input", () => this.setPosition(Number(range.value)));
    this.imageA = imageA;
    this.handle = el("div", { className: "fluxq-handle" });
    stage.append(imageB, imageA, this.handle, ...captions, range);
    return stage;
  }
}

app.registerExtension({
  name: "FluxQLoraLab.CompareView",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_ID) return;
    injectStyle();

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const view = new CompareView();
      const widget = this.addDOMWidget(WIDGET_NAME, WIDGET_NAME, view.root, {
        serialize: false,
        hideOnZoom: false,
        getMinHeight: () => (view.hasData ? VIEW_HEIGHT : EMPTY_HEIGHT),
      });
      widget.serialize = false; // the view is output, not a workflow value
      this.fluxqCompare = view;
      this.setSize([Math.max(this.size[0], 360), this.computeSize()[1]]);
      return result;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const cells = output?.fluxq_cells;
      const layout = output?.fluxq_grid?.[0];
      if (!this.fluxqCompare || !cells?.length || !layout) return;
      this.fluxqCompare.setData(cells, layout);
      this.setSize([Math.max(this.size[0], 360), Math.max(this.size[1], this.computeSize()[1])]);
      this.setDirtyCanvas?.(true, true);
    };
  },
});

// FluxQTrainLoRA: "Export training settings" writes the node's inputs as the JSON file that
// scripts/fluxq_train.py reads (keys = input names). model/clip/vae become the file names of the
// loader nodes they come from, as the script loads them.
const TRAIN_NODE_ID = "FluxQTrainLoRA";
const LOADER_FILES = {
  FluxQLoadGGUF: (w) => w.gguf_name,
  UNETLoader: (w) => w.unet_name,
  FluxQLoadTextEncodersGGUF: (w) => (w.t5_name && w.t5_name !== "none" ? [w.clip_name, w.t5_name] : w.clip_name),
  // the script takes [CLIP-L, T5-XXL]: CLIP-L first, whichever slot it is in
  DualCLIPLoader: (w) => [w.clip_name1, w.clip_name2].sort((a, b) => /clip_l/i.test(b) - /clip_l/i.test(a)),
  CLIPLoader: (w) => w.clip_name,
  VAELoader: (w) => w.vae_name,
};

function widgetValues(node) {
  return Object.fromEntries((node.widgets ?? []).filter((w) => w.name && w.serialize !== false).map((w) => [w.name, w.value]));
}

function trainingSettings(node) {
  const settings = {};
  for (const input of node.inputs ?? []) {
    if (!["model", "clip", "vae"].includes(input.name) || input.link == null) continue;
    const source = node.graph.getNodeById(node.graph.links[input.link].origin_id);
    const files = LOADER_FILES[source?.type];
    if (files) settings[input.name] = files(widgetValues(source));
  }
  return { ...settings, ...widgetValues(node) };
}

app.registerExtension({
  name: "FluxQLoraLab.TrainSettingsExport",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== TRAIN_NODE_ID) return;
    const getExtraMenuOptions = nodeType.prototype.getExtraMenuOptions;
    nodeType.prototype.getExtraMenuOptions = function (canvas, options) {
      const result = getExtraMenuOptions?.apply(this, arguments);
      options.push({
        content: "Export training settings (for fluxq_train.py)",
        callback: () => {
          const settings = trainingSettings(this);
          const blob = new Blob([JSON.stringify(settings, null, 2) + "\n"], { type: "application/json" });
          const link = el("a", { href: URL.createObjectURL(blob), download: `${settings.lora_name || "fluxq_lora"}.train.json` });
          link.click();
          URL.revokeObjectURL(link.href);
        },
      });
      return result;
    };
  },
});
