"""Static checks of what only the Slicer application (or its build) runs.

For every scripted module folder of the extension:
- the module file and every .py of the module compile;
- every ``self.ui.<name>`` the module file uses exists in the module's .ui file, and what the code
  does with it (attributes, methods, signals) belongs to that widget's class;
- every ``SlicerParameterName`` of the .ui names a parameter of the module's ``@parameterNodeWrapper``
  class, on a widget that fits the parameter's type (node selectors show the annotated node types);
- every .py/.ui/icon in the module folder is listed in its CMakeLists.txt (MODULE_PYTHON_SCRIPTS,
  MODULE_PYTHON_RESOURCES) and every listed file exists; with CMake installed, the CMake files are
  configured against stand-ins of Slicer's macros, which also checks that every file lands inside
  qt-scripted-modules (ddm4d included);
- the extension description agrees across DDMExtension.s4ext, DDMExtension.json (the catalog entry, in
  Slicer's JSON schema, which admits only the build facts) and the EXTENSION_* of the top CMakeLists.txt
  (where Slicer reads homepage, description, icon, screenshots and contributors).
"""
from __future__ import annotations

import ast
import json
import py_compile
import re
import shutil
import struct
import subprocess
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["DDMInterpolation", "DDMTraining"]
LISTED_SUFFIXES = {".py", ".ui", ".png", ".svg", ".jpg"}
QT_SCRIPTED_MODULES = "lib/Slicer-X.Y/qt-scripted-modules"


def module_dir(name: str) -> Path:
    folder = ROOT / name
    assert (folder / f"{name}.py").is_file(), f"{name}/{name}.py is missing"
    return folder


# ------------------------------------------------------------------------------------------ widget API
# What code may do with a widget of each class: properties, methods and signals (a curated subset of
# Qt, CTK and Slicer's MRML widgets; extend it when a module uses something new).

_QOBJECT = {"connect", "disconnect", "objectName", "setObjectName", "blockSignals", "property", "setProperty",
            "deleteLater", "destroyed", "findChild", "findChildren", "parent", "setParent", "installEventFilter",
            "signalsBlocked", "children"}
_QWIDGET = _QOBJECT | {
    "enabled", "setEnabled", "isEnabled", "visible", "setVisible", "isVisible", "hidden", "setHidden", "show",
    "hide", "toolTip", "setToolTip", "statusTip", "setStatusTip", "whatsThis", "update", "repaint", "setFocus",
    "layout", "setLayout", "width", "height", "size", "resize", "minimumWidth", "maximumWidth", "minimumHeight",
    "maximumHeight", "setMinimumWidth", "setMaximumWidth", "setMinimumHeight", "setMaximumHeight",
    "setFixedWidth", "setFixedHeight", "setFixedSize", "styleSheet", "setStyleSheet", "font", "setFont",
    "palette", "setPalette", "sizePolicy", "setSizePolicy", "window", "windowTitle", "setWindowTitle",
    "adjustSize", "geometry", "setGeometry", "addAction", "actions", "cursor", "setCursor", "unsetCursor",
    "updatesEnabled", "setUpdatesEnabled", "focusPolicy", "setFocusPolicy", "close", "raise_", "lower",
    "contextMenuPolicy", "setContextMenuPolicy", "customContextMenuRequested", "rect"}
_ABSTRACT_BUTTON = _QWIDGET | {
    "text", "setText", "checked", "setChecked", "isChecked", "checkable", "setCheckable", "click",
    "animateClick", "toggle", "clicked", "toggled", "pressed", "released", "icon", "setIcon", "iconSize",
    "setIconSize", "shortcut", "setShortcut", "autoRepeat", "autoExclusive", "setAutoExclusive", "down"}
_ABSTRACT_SPIN = _QWIDGET | {
    "text", "editingFinished", "readOnly", "setReadOnly", "alignment", "setAlignment", "buttonSymbols",
    "setButtonSymbols", "stepUp", "stepDown", "stepBy", "clear", "selectAll", "wrapping", "setWrapping",
    "keyboardTracking", "setKeyboardTracking", "specialValueText", "setSpecialValueText"}
_SPIN = _ABSTRACT_SPIN | {
    "value", "setValue", "minimum", "maximum", "setMinimum", "setMaximum", "setRange", "singleStep",
    "setSingleStep", "prefix", "suffix", "setPrefix", "setSuffix", "valueChanged", "textChanged", "cleanText"}
_COMBO = _QWIDGET | {
    "addItem", "addItems", "insertItem", "insertItems", "removeItem", "clear", "count", "currentIndex",
    "setCurrentIndex", "currentText", "setCurrentText", "currentData", "itemData", "setItemData", "itemText",
    "setItemText", "itemIcon", "setItemIcon", "findData", "findText", "currentIndexChanged",
    "currentTextChanged", "activated", "textActivated", "highlighted", "editTextChanged", "editable",
    "setEditable", "model", "setModel", "view", "lineEdit", "showPopup", "hidePopup", "insertSeparator",
    "maxVisibleItems", "setMaxVisibleItems", "placeholderText", "setPlaceholderText", "sizeAdjustPolicy",
    "setSizeAdjustPolicy", "minimumContentsLength", "setMinimumContentsLength"}
_TEXT_EDIT = _QWIDGET | {
    "plainText", "setPlainText", "toPlainText", "clear", "readOnly", "setReadOnly", "textChanged", "document",
    "verticalScrollBar", "horizontalScrollBar", "moveCursor", "textCursor", "setTextCursor", "placeholderText",
    "setPlaceholderText", "insertPlainText", "ensureCursorVisible", "selectAll", "copy", "lineWrapMode",
    "setLineWrapMode"}
_NODE_SELECTOR = _QWIDGET | {
    "currentNode", "setCurrentNode", "currentNodeID", "setCurrentNodeID", "currentNodeChanged",
    "currentNodeIDChanged", "nodeTypes", "setNodeTypes", "noneEnabled", "setNoneEnabled", "addEnabled",
    "setAddEnabled", "removeEnabled", "setRemoveEnabled", "renameEnabled", "setRenameEnabled", "editEnabled",
    "showHidden", "setShowHidden", "showChildNodeTypes", "setShowChildNodeTypes", "hideChildNodeTypes",
    "setHideChildNodeTypes", "selectNodeUponCreation", "baseName", "setBaseName", "mrmlScene", "setMRMLScene",
    "addAttribute", "removeAttribute", "nodeCount", "nodeFromIndex", "nodeAdded", "nodeAboutToBeRemoved",
    "nodeActivated", "nodeAddedByUser", "addNode", "removeCurrentNode", "renameCurrentNode", "editCurrentNode",
    "noneDisplay", "setNoneDisplay", "sortFilterProxyModel", "interactionNodeSingletonTag"}

KNOWN_WIDGET_API = {
    "QWidget": _QWIDGET,
    "QFrame": _QWIDGET | {"frameShape", "setFrameShape", "frameShadow", "setFrameShadow", "lineWidth"},
    "QPushButton": _ABSTRACT_BUTTON | {"default", "setDefault", "autoDefault", "setAutoDefault", "flat",
                                       "setFlat", "menu", "setMenu", "showMenu"},
    "QToolButton": _ABSTRACT_BUTTON | {"defaultAction", "setDefaultAction", "popupMode", "setPopupMode",
                                       "toolButtonStyle", "setToolButtonStyle", "menu", "setMenu", "showMenu",
                                       "triggered", "autoRaise", "setAutoRaise"},
    "QCheckBox": _ABSTRACT_BUTTON | {"checkState", "setCheckState", "tristate", "setTristate", "stateChanged",
                                     "checkStateChanged"},
    "QRadioButton": _ABSTRACT_BUTTON,
    "QSpinBox": _SPIN,
    "QDoubleSpinBox": _SPIN | {"decimals", "setDecimals"},
    "QComboBox": _COMBO,
    "QLabel": _QWIDGET | {"text", "setText", "clear", "wordWrap", "setWordWrap", "pixmap", "setPixmap",
                          "alignment", "setAlignment", "textFormat", "setTextFormat", "openExternalLinks",
                          "setOpenExternalLinks", "linkActivated", "linkHovered", "setNum", "textInteractionFlags",
                          "setTextInteractionFlags", "buddy", "setBuddy", "indent", "setIndent"},
    "QLineEdit": _QWIDGET | {"text", "setText", "clear", "placeholderText", "setPlaceholderText", "textChanged",
                             "textEdited", "editingFinished", "returnPressed", "readOnly", "setReadOnly",
                             "selectAll", "validator", "setValidator", "maxLength", "setMaxLength", "echoMode",
                             "setEchoMode", "clearButtonEnabled", "setClearButtonEnabled", "inputMask",
                             "setInputMask", "cursorPosition", "setCursorPosition", "displayText"},
    "QProgressBar": _QWIDGET | {"value", "setValue", "minimum", "maximum", "setMinimum", "setMaximum",
                                "setRange", "reset", "format", "setFormat", "textVisible", "setTextVisible",
                                "valueChanged", "text", "orientation", "invertedAppearance"},
    "QPlainTextEdit": _TEXT_EDIT | {"appendPlainText", "maximumBlockCount", "setMaximumBlockCount",
                                    "centerCursor"},
    "QTextEdit": _TEXT_EDIT | {"html", "setHtml", "toHtml", "append", "insertHtml", "markdown", "setMarkdown"},
    "QTextBrowser": _TEXT_EDIT | {"html", "setHtml", "toHtml", "append", "insertHtml", "markdown", "setMarkdown",
                                  "openExternalLinks", "setOpenExternalLinks", "anchorClicked", "source",
                                  "setSource"},
    "QTabWidget": _QWIDGET | {"currentIndex", "setCurrentIndex", "currentWidget", "setCurrentWidget", "count",
                              "widget", "indexOf", "tabText", "setTabText", "setTabEnabled", "isTabEnabled",
                              "setTabVisible", "isTabVisible", "currentChanged", "tabBarClicked", "addTab",
                              "insertTab", "removeTab", "tabBar", "setTabToolTip", "clear"},
    "QStackedWidget": _QWIDGET | {"currentIndex", "setCurrentIndex", "currentWidget", "setCurrentWidget",
                                  "count", "widget", "indexOf", "addWidget", "insertWidget", "removeWidget",
                                  "currentChanged"},
    "QGroupBox": _QWIDGET | {"title", "setTitle", "checkable", "setCheckable", "checked", "setChecked",
                             "isChecked", "toggled", "clicked", "flat", "setFlat"},
    "QSlider": _QWIDGET | {"value", "setValue", "minimum", "maximum", "setMinimum", "setMaximum", "setRange",
                           "valueChanged", "sliderMoved", "sliderPressed", "sliderReleased", "singleStep",
                           "setSingleStep", "pageStep", "setPageStep", "orientation", "tickInterval"},
    "QListWidget": _QWIDGET | {"addItem", "addItems", "clear", "count", "currentRow", "setCurrentRow",
                               "currentItem", "item", "takeItem", "selectedItems", "itemClicked",
                               "itemDoubleClicked", "currentRowChanged", "itemSelectionChanged", "insertItem",
                               "sortItems", "findItems", "row"},
    "QTableWidget": _QWIDGET | {"rowCount", "columnCount", "setRowCount", "setColumnCount", "setItem", "item",
                                "clear", "clearContents", "setHorizontalHeaderLabels", "setVerticalHeaderLabels",
                                "horizontalHeader", "verticalHeader", "resizeColumnsToContents", "cellClicked",
                                "cellDoubleClicked", "itemSelectionChanged", "selectedItems", "currentRow",
                                "insertRow", "removeRow", "setCellWidget", "cellWidget", "setEditTriggers",
                                "setSelectionBehavior", "setSelectionMode", "setSortingEnabled", "sortItems"},
    "QScrollArea": _QWIDGET | {"widget", "setWidget", "widgetResizable", "setWidgetResizable"},
    "QDialogButtonBox": _QWIDGET | {"accepted", "rejected", "button", "addButton", "standardButtons",
                                    "setStandardButtons", "clicked"},
    "ctkCollapsibleButton": _ABSTRACT_BUTTON | {"collapsed", "setCollapsed", "collapsedHeight",
                                                "setCollapsedHeight", "contentsCollapsed", "contentsFrameShape",
                                                "setContentsFrameShape", "buttonTextAlignment",
                                                "indicatorAlignment"},
    "ctkCollapsibleGroupBox": _QWIDGET | {"title", "setTitle", "collapsed", "setCollapsed", "collapsedHeight",
                                          "checked", "setChecked", "toggled", "clicked"},
    "ctkPathLineEdit": _QWIDGET | {"currentPath", "setCurrentPath", "filters", "setFilters", "nameFilters",
                                   "setNameFilters", "label", "setLabel", "currentPathChanged",
                                   "validInputChanged", "addCurrentPathToHistory", "settingKey", "setSettingKey",
                                   "showBrowseButton", "setShowBrowseButton", "showHistoryButton",
                                   "setShowHistoryButton", "options", "setOptions", "sizeAdjustPolicy",
                                   "setSizeAdjustPolicy", "retrieveHistory", "comboBox", "browse",
                                   "minimumContentsLength", "setMinimumContentsLength", "Dirs", "Files",
                                   "Executable", "Readable", "Writable", "Drives", "Hidden", "NoDot", "NoDotDot",
                                   "AllEntries", "ShowDirsOnly"},
    "ctkDirectoryButton": _QWIDGET | {"directory", "setDirectory", "directoryChanged", "directorySelected",
                                      "caption", "setCaption", "text", "setText", "options", "setOptions",
                                      "acceptMode", "setAcceptMode", "browse", "icon", "setIcon"},
    "ctkSliderWidget": _QWIDGET | {"value", "setValue", "minimum", "maximum", "setMinimum", "setMaximum",
                                   "setRange", "singleStep", "setSingleStep", "pageStep", "setPageStep",
                                   "decimals", "setDecimals", "valueChanged", "valueIsChanging", "prefix",
                                   "suffix", "setPrefix", "setSuffix", "tracking", "setTracking", "spinBox",
                                   "slider", "quantity", "setQuantity", "tickInterval", "setTickInterval"},
    "ctkRangeWidget": _QWIDGET | {"minimumValue", "maximumValue", "setMinimumValue", "setMaximumValue",
                                  "setValues", "minimum", "maximum", "setMinimum", "setMaximum", "setRange",
                                  "valuesChanged", "minimumValueChanged", "maximumValueChanged", "singleStep",
                                  "setSingleStep", "decimals", "setDecimals"},
    "ctkDoubleSpinBox": _QWIDGET | {"value", "setValue", "minimum", "maximum", "setMinimum", "setMaximum",
                                    "setRange", "decimals", "setDecimals", "singleStep", "setSingleStep",
                                    "valueChanged", "prefix", "suffix", "setPrefix", "setSuffix", "quantity",
                                    "setQuantity", "readOnly", "setReadOnly"},
    "ctkCheckBox": _ABSTRACT_BUTTON | {
        "checkState", "setCheckState", "stateChanged", "indicatorIcon", "setIndicatorIcon"},
    "ctkComboBox": _COMBO | {"defaultText", "setDefaultText", "defaultIcon", "setDefaultIcon", "forceDefault",
                             "setForceDefault", "elideMode", "setElideMode", "scrollWheelEffect"},
    "ctkMenuButton": _ABSTRACT_BUTTON | {"menu", "setMenu", "showMenu"},
    "ctkFittedTextBrowser": _TEXT_EDIT | {"html", "setHtml", "append", "collapsibleText", "setCollapsibleText",
                                          "showMoreText", "setShowMoreText", "showLessText", "setShowLessText",
                                          "openExternalLinks", "setOpenExternalLinks"},
    "qMRMLWidget": _QWIDGET | {"mrmlScene", "setMRMLScene", "mrmlSceneChanged"},
    "qMRMLNodeComboBox": _NODE_SELECTOR,
    "qMRMLSubjectHierarchyComboBox": _QWIDGET | {"currentItem", "setCurrentItem", "currentItemChanged",
                                                 "mrmlScene", "setMRMLScene", "nodeTypes", "setNodeTypes",
                                                 "noneEnabled", "setNoneEnabled", "clearSelection"},
    "qMRMLSubjectHierarchyTreeView": _QWIDGET | {"currentItem", "setCurrentItem", "currentItemChanged",
                                                 "mrmlScene", "setMRMLScene", "nodeTypes", "setNodeTypes",
                                                 "selectedIndexes", "clearSelection", "setRootItem"},
    "qMRMLSegmentSelectorWidget": _QWIDGET | {"currentNode", "setCurrentNode", "currentNodeChanged",
                                              "currentSegmentID", "setCurrentSegmentID", "currentSegmentChanged",
                                              "mrmlScene", "setMRMLScene", "noneEnabled", "setNoneEnabled"},
    "qMRMLPlotWidget": _QWIDGET | {"mrmlPlotViewNode", "setMRMLPlotViewNode", "plotView", "mrmlScene",
                                   "setMRMLScene"},
    "qMRMLPlotView": _QWIDGET | {"mrmlPlotViewNode", "setMRMLPlotViewNode", "fitToContent", "mrmlScene",
                                 "setMRMLScene"},
    "qMRMLTableView": _QWIDGET | {"mrmlTableNode", "setMRMLTableNode", "mrmlScene", "setMRMLScene"},
    "qMRMLSequenceBrowserPlayWidget": _QWIDGET | {"setMRMLSequenceBrowserNode", "mrmlScene", "setMRMLScene"},
    "qMRMLSequenceBrowserSeekWidget": _QWIDGET | {"setMRMLSequenceBrowserNode", "mrmlScene", "setMRMLScene"},
}

# parameterNodeWrapper types -> widget classes its GUI connectors bind (Slicer's parameter node docs)
PARAMETER_WIDGETS = {
    "bool": {"QCheckBox", "QRadioButton", "QPushButton", "QToolButton", "ctkCheckBox", "QGroupBox",
             "ctkCollapsibleButton", "ctkCollapsibleGroupBox"},
    "int": {"QSpinBox", "QSlider", "ctkSliderWidget", "QComboBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox", "QSlider", "QComboBox"},
    "str": {"QLineEdit", "QComboBox", "QLabel"},
    "Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "node": {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyComboBox"},
}


def ui_widgets(ui_path: Path) -> dict[str, ET.Element]:
    tree = ET.parse(ui_path)
    widgets = {w.get("name"): w for w in tree.iter("widget")}
    widgets.update({a.get("name"): a for a in tree.iter("action")})
    return widgets


def widget_class(element: ET.Element) -> str:
    return element.get("class") or "QAction"


def ui_uses(module_source: str) -> list[tuple[str, str | None, str | None, int]]:
    """(name, attribute or None, signal name or None, line) for each self.ui.<name>[.<attribute>] in the code."""
    tree = ast.parse(module_source)
    uses = []
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ui" and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"):
            continue
        parent = parents.get(node)
        attribute = parent.attr if isinstance(parent, ast.Attribute) and parent.value is node else None
        signal = None
        call = parents.get(parent) if attribute else None
        if attribute in ("connect", "disconnect") and isinstance(call, ast.Call) and call.args \
                and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str):
            signal = call.args[0].value.split("(")[0]
        uses.append((node.attr, attribute, signal, node.lineno))
    return uses


def parameter_types(module_source: str) -> dict[str, tuple[str, set[str]]]:
    """Parameters of the @parameterNodeWrapper class: name -> (kind, node class names for node kinds)."""
    tree = ast.parse(module_source)
    params = {}
    for cls in [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]:
        decorators = {getattr(d, "id", getattr(d, "attr", None)) for d in cls.decorator_list}
        if "parameterNodeWrapper" not in decorators:
            continue
        for statement in cls.body:
            if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                params[statement.target.id] = _annotation_kind(statement.annotation)
    return params


def _annotation_kind(annotation) -> tuple[str, set[str]]:
    if isinstance(annotation, ast.Subscript):
        base = getattr(annotation.value, "id", getattr(annotation.value, "attr", ""))
        inner = annotation.slice
        if base == "Annotated":
            return _annotation_kind(inner.elts[0])
        if base in ("Union", "Optional"):
            elements = inner.elts if isinstance(inner, ast.Tuple) else [inner]
            names = {getattr(e, "id", getattr(e, "attr", "")) for e in elements} - {"None"}
            if all(n.startswith("vtkMRML") for n in names):
                return "node", names
        return base, set()
    name = getattr(annotation, "id", getattr(annotation, "attr", ""))
    if name.startswith("vtkMRML"):
        return "node", {name}
    if name in ("Path", "PosixPath", "WindowsPath"):
        return "Path", set()
    return name, set()


def cmake_list(cmake_text: str, variable: str, module_name: str) -> list[str]:
    match = re.search(r"set\(\s*" + variable + r"\s+(.*?)\)", cmake_text, re.S)
    if not match:
        return []
    body = re.sub(r"#.*", "", match.group(1))
    return [item.replace("${MODULE_NAME}", module_name) for item in body.split()]


# ------------------------------------------------------------------------------------------ per module

@pytest.mark.parametrize("name", MODULES)
def test_module_python_files_compile(name, tmp_path):
    folder = module_dir(name)
    for path in sorted(folder.rglob("*.py")):
        py_compile.compile(str(path), cfile=str(tmp_path / "compiled.pyc"), doraise=True)


@pytest.mark.parametrize("name", MODULES)
def test_widget_uses_only_what_the_ui_file_has(name):
    folder = module_dir(name)
    ui_path = folder / "Resources" / "UI" / f"{name}.ui"
    source = (folder / f"{name}.py").read_text(encoding="utf-8")
    uses = ui_uses(source)
    assert uses, f"{name}.py uses no self.ui widgets: is the widget still loading {name}.ui?"
    assert ui_path.is_file(), f"{name}.py uses self.ui but {ui_path.relative_to(ROOT)} is missing"
    widgets = ui_widgets(ui_path)
    problems = []
    for widget, attribute, signal, line in uses:
        if widget not in widgets:
            problems.append(f"line {line}: self.ui.{widget} is not in {ui_path.name}")
            continue
        cls = widget_class(widgets[widget])
        api = KNOWN_WIDGET_API.get(cls)
        if api is None:
            problems.append(f"line {line}: self.ui.{widget} is a {cls}, which this test does not know; "
                            "add its API to KNOWN_WIDGET_API")
            continue
        if attribute is not None and attribute not in api:
            problems.append(f"line {line}: self.ui.{widget}.{attribute}: a {cls} has no '{attribute}'")
        if signal is not None and signal not in api:
            problems.append(f"line {line}: self.ui.{widget} connects '{signal}', which a {cls} does not emit")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", MODULES)
def test_ui_parameter_bindings_fit_the_parameter_node(name):
    folder = module_dir(name)
    ui_path = folder / "Resources" / "UI" / f"{name}.ui"
    assert ui_path.is_file(), f"{name} has no .ui file at {ui_path.relative_to(ROOT)}"
    params = parameter_types((folder / f"{name}.py").read_text(encoding="utf-8"))
    problems = []
    for widget_name, element in ui_widgets(ui_path).items():
        bound = element.find("property[@name='SlicerParameterName']/string")
        if bound is None:
            continue
        parameter = bound.text
        if parameter not in params:
            problems.append(f"{widget_name} binds '{parameter}', which the @parameterNodeWrapper class lacks")
            continue
        kind, node_classes = params[parameter]
        cls = widget_class(element)
        if cls not in PARAMETER_WIDGETS.get(kind, set()):
            problems.append(f"{widget_name} ({cls}) cannot show '{parameter}' of type {kind}")
        if kind == "node" and cls == "qMRMLNodeComboBox":
            shown = {s.text for s in element.findall("property[@name='nodeTypes']/stringlist/string")}
            if shown != node_classes:
                problems.append(f"{widget_name} shows {sorted(shown)} but '{parameter}' is {sorted(node_classes)}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", MODULES)
def test_cmake_lists_every_module_file(name):
    folder = module_dir(name)
    cmake_text = (folder / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"set\(\s*MODULE_NAME\s+" + name + r"\s*\)", cmake_text), "set(MODULE_NAME ...) is off"
    listed = cmake_list(cmake_text, "MODULE_PYTHON_SCRIPTS", name) + cmake_list(
        cmake_text, "MODULE_PYTHON_RESOURCES", name)
    assert len(listed) == len(set(listed)), f"listed twice: {[f for f in listed if listed.count(f) > 1]}"
    missing_files = [item for item in listed if not (folder / item).is_file()]
    assert not missing_files, f"listed in {name}/CMakeLists.txt but not there: {missing_files}"
    present = sorted(str(p.relative_to(folder)).replace("\\", "/") for p in folder.rglob("*")
                     if p.suffix in LISTED_SUFFIXES and p.is_file()
                     and not p.relative_to(folder).parts[0] == "Testing" and "__pycache__" not in p.parts)
    unlisted = [item for item in present if item not in listed]
    assert not unlisted, f"in {name}/ but not listed in its CMakeLists.txt: {unlisted}"
    assert f"Resources/Icons/{name}.png" in listed and f"{name}.py" in listed
    testing = folder / "Testing" / "Python" / "CMakeLists.txt"
    assert testing.is_file() and "slicer_add_python_unittest" in testing.read_text(encoding="utf-8"), \
        f"{name}/Testing/Python/CMakeLists.txt must register the self-test with slicer_add_python_unittest"


# ------------------------------------------------------------------------------------------ CMake configure

STUB_SLICER = {
    "SlicerConfig.cmake": """
        set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)
        set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/GenerateConfig.cmake)
        set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/CPack.cmake)
        """,
    "UseSlicer.cmake": """
        # Stand-ins of Slicer's and CTK's macros: check what the real ones check, record the copies
        set(Slicer_QTSCRIPTEDMODULES_LIB_DIR QTSCRIPTED)
        set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR QTSCRIPTED)
        set(BUILD_TESTING ON)
        set(RECORD ${CMAKE_BINARY_DIR}/record.txt)
        file(WRITE ${RECORD} "")
        function(_record)
          string(REPLACE ";" "\\t" line "${ARGN}")
          file(APPEND ${RECORD} "${line}\\n")
        endfunction()
        function(ctkMacroCompilePythonScript)
          cmake_parse_arguments(MY "NO_INSTALL_SUBDIR;GLOBAL_TARGET"
            "TARGET_NAME;SOURCE_DIR;DESTINATION_DIR;INSTALL_DIR" "SCRIPTS;RESOURCES" ${ARGN})
          if(NOT MY_SOURCE_DIR)
            set(MY_SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR})
          endif()
          foreach(kind SCRIPTS RESOURCES)
            foreach(file ${MY_${kind}})
              if(IS_ABSOLUTE ${file})
                message(FATAL_ERROR "absolute path given to ctkMacroCompilePythonScript: ${file}")
              endif()
              get_filename_component(src ${MY_SOURCE_DIR}/${file} ABSOLUTE)
              if(NOT EXISTS ${src})
                message(FATAL_ERROR "ctkMacroCompilePythonScript given nonexistent file ${src}")
              endif()
              get_filename_component(dst ${MY_DESTINATION_DIR}/${file} ABSOLUTE)
              _record(copy ${kind} ${src} ${dst})
            endforeach()
          endforeach()
        endfunction()
        function(slicerMacroBuildScriptedModule)
          cmake_parse_arguments(MY "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
          if(MY_UNPARSED_ARGUMENTS)
            message(FATAL_ERROR "Unknown keywords given to slicerMacroBuildScriptedModule(): ${MY_UNPARSED_ARGUMENTS}")
          endif()
          _record(module ${MY_NAME} ${CMAKE_CURRENT_SOURCE_DIR})
          ctkMacroCompilePythonScript(TARGET_NAME ${MY_NAME} SCRIPTS "${MY_SCRIPTS}" RESOURCES "${MY_RESOURCES}"
            DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}
            INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR} NO_INSTALL_SUBDIR)
        endfunction()
        function(slicer_add_python_unittest)
          cmake_parse_arguments(MY "" "SCRIPT;TESTNAME_PREFIX" "SLICER_ARGS" ${ARGN})
          get_filename_component(script ${MY_SCRIPT} ABSOLUTE BASE_DIR ${CMAKE_CURRENT_SOURCE_DIR})
          if(NOT EXISTS ${script})
            message(FATAL_ERROR "slicer_add_python_unittest given nonexistent script ${script}")
          endif()
          _record(unittest ${script})
        endfunction()
        """,
    "GenerateConfig.cmake": """
        foreach(field HOMEPAGE CATEGORY CONTRIBUTORS DESCRIPTION ICONURL SCREENSHOTURLS DEPENDS)
          _record(extension ${field} "${EXTENSION_${field}}")
        endforeach()
        """,
    "CPack.cmake": "",
}


def configure(tmp_path: Path, source_dir: Path) -> list[list[str]]:
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("CMake is not installed; the CMake files were checked by reading them only")
    stub = tmp_path / "stub"
    stub.mkdir(exist_ok=True)
    for file_name, text in STUB_SLICER.items():
        (stub / file_name).write_text(textwrap.dedent(text))
    build = tmp_path / "build"
    result = subprocess.run([cmake, "-S", str(source_dir), "-B", str(build), f"-DSlicer_DIR={stub}"],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and "CMAKE_C_COMPILER" in result.stderr + result.stdout:
        pytest.skip("no C/C++ compiler for CMake's project(); the CMake files were checked by reading them only")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [line.split("\t") for line in (build / "record.txt").read_text().splitlines() if line]


def check_copies(records: list[list[str]], build: Path) -> list[Path]:
    qt_scripted = (build / "QTSCRIPTED").resolve()
    copies = [(Path(src), Path(dst)) for kind, *rest in records if kind == "copy" for _, src, dst in [rest]]
    outside = [str(dst) for _, dst in copies if qt_scripted not in dst.parents]
    assert not outside, f"files that would be copied outside qt-scripted-modules: {outside}"
    return [dst.relative_to(qt_scripted) for _, dst in copies]


def test_module_cmake_configures_and_ships_ddm4d(tmp_path):
    module_dir("DDMInterpolation")
    project = tmp_path / "project"
    project.mkdir()
    (project / "CMakeLists.txt").write_text(textwrap.dedent(f"""
        cmake_minimum_required(VERSION 3.16)
        project(ModuleOnly NONE)
        find_package(Slicer REQUIRED)
        include(${{Slicer_USE_FILE}})
        add_subdirectory({(ROOT / 'DDMInterpolation').as_posix()} DDMInterpolation)
        """))
    records = configure(tmp_path, project)
    shipped = {path.as_posix() for path in check_copies(records, tmp_path / "build")}
    ddm4d_files = {p.relative_to(ROOT).as_posix() for p in (ROOT / "ddm4d").rglob("*.py")
                   if "__pycache__" not in p.parts}
    assert ddm4d_files and ddm4d_files <= shipped, f"ddm4d files not shipped: {sorted(ddm4d_files - shipped)}"
    models_dir = ROOT / "Resources" / "models"  # where ddm4d.generation.bundled_model_path looks
    models = {p.relative_to(ROOT).as_posix() for p in models_dir.glob("*") if p.is_file()}
    assert models <= shipped, f"bundled models not shipped: {sorted(models - shipped)}"
    assert "DDMInterpolation.py" in shipped and "DDMInterpolationLib/Logic.py" in shipped
    assert ["unittest", str((ROOT / "DDMInterpolation" / "DDMInterpolation.py").resolve())] in [
        [kind, str(Path(path).resolve())] for kind, path, *_ in [r for r in records if r[0] == "unittest"]]


def test_extension_cmake_configures_with_its_modules(tmp_path):
    for name in MODULES:
        module_dir(name)
    records = configure(tmp_path, ROOT)
    modules = [r[1] for r in records if r[0] == "module"]
    assert sorted(modules) == sorted(MODULES)
    check_copies(records, tmp_path / "build")
    recorded = {r[1]: r[2] for r in records if r[0] == "extension"}
    s4ext = read_s4ext()
    for field, key in (("HOMEPAGE", "homepage"), ("CATEGORY", "category"), ("CONTRIBUTORS", "contributors"),
                       ("DESCRIPTION", "description"), ("ICONURL", "iconurl"),
                       ("SCREENSHOTURLS", "screenshoturls"), ("DEPENDS", "depends")):
        assert recorded[field].replace(";", " ") == s4ext[key], field


# ------------------------------------------------------------------------------------------ extension

CATALOG_SCHEMA = {  # Slicer/Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json (additionalProperties: false)
    "required": {"$schema", "category", "scm_url"},
    "properties": {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                   "build_dependencies": list, "dicom_support_rule": str, "build_subdirectory": str,
                   "enabled": bool, "tier": int},
}


def read_s4ext() -> dict[str, str]:
    fields = {}
    for line in (ROOT / "DDMExtension.s4ext").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            assert key not in fields, f"{key} is given twice in DDMExtension.s4ext"
            fields[key] = value.strip()
    return fields


def read_cmake_extension() -> dict[str, str]:
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    return {key.lower(): value for key, value in re.findall(r'set\(EXTENSION_(\w+)\s+"([^"]*)"\)', text)}


def test_s4ext_json_and_cmake_agree():
    s4ext = read_s4ext()
    catalog = json.loads((ROOT / "DDMExtension.json").read_text(encoding="utf-8"))
    cmake = read_cmake_extension()

    for key in ("scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors",
                "category", "iconurl", "status", "description", "screenshoturls", "enabled"):
        assert s4ext.get(key), f"DDMExtension.s4ext has no {key}"
    assert "PyTorch" in s4ext["depends"].split()

    missing = CATALOG_SCHEMA["required"] - set(catalog)
    extra = set(catalog) - set(CATALOG_SCHEMA["properties"])
    assert not missing and not extra, f"DDMExtension.json: missing {missing}, not in Slicer's schema {extra}"
    for key, value in catalog.items():
        assert isinstance(value, CATALOG_SCHEMA["properties"][key]), f"DDMExtension.json: {key} has the wrong type"
    assert catalog["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                                         "slicer-extension-catalog-entry-schema-v1.0.")
    # the build facts: .s4ext <-> .json
    assert catalog["scm_url"] == s4ext["scmurl"]
    assert catalog.get("scm_revision") == s4ext["scmrevision"]
    assert catalog.get("scm_type", "git") == s4ext["scm"]
    assert catalog.get("build_dependencies", []) == s4ext["depends"].split()
    assert catalog.get("build_subdirectory", ".") == s4ext["build_subdirectory"]
    assert catalog["category"] == s4ext["category"]
    assert catalog.get("enabled", True) == (s4ext["enabled"] == "1")
    # the description facts: .s4ext <-> top CMakeLists.txt (where Slicer's extension build reads them)
    for key in ("homepage", "category", "contributors", "description", "iconurl", "screenshoturls", "depends"):
        assert cmake.get(key) == s4ext[key], f"EXTENSION_{key.upper()} differs from the .s4ext {key}"


def repository_path(url: str) -> Path | None:
    """The file of this repository a raw.githubusercontent.com URL of the homepage's repository points to."""
    homepage = read_s4ext()["homepage"].rstrip("/")
    match = re.match(r"https://github\.com/([^/]+)/([^/]+)$", homepage)
    if not match:
        return None
    prefix = f"https://raw.githubusercontent.com/{match.group(1)}/{match.group(2)}/{read_s4ext()['scmrevision']}/"
    return ROOT / url[len(prefix):] if url.startswith(prefix) else None


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def test_icon_and_screenshots_are_in_the_repository():
    s4ext = read_s4ext()
    icon = repository_path(s4ext["iconurl"])
    assert icon is not None and icon.is_file(), f"iconurl points to {icon}, which is not in the repository"
    assert png_size(icon) == (128, 128)
    for url in s4ext["screenshoturls"].split():
        screenshot = repository_path(url)
        assert screenshot is not None and screenshot.is_file(), f"screenshot {url} is not in the repository"
        png_size(screenshot)
    for name in MODULES:
        if (ROOT / name).is_dir():
            png_size(ROOT / name / "Resources" / "Icons" / f"{name}.png")
