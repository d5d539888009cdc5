"""A modal form built from a FormSpec: validates as the operator types, submits through the App.

Errors stay in the form, under the field they concern (or under the form
for server answers), so the operator can correct and resubmit without
starting over; the server's answer is also raised as a notification.
"""

from __future__ import annotations

from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select

from bus.errors import BusError
from tui.app.forms import FormError, FormSpec


class FormScreen(ModalScreen[Any]):
    """Dismissed with (request, reply) on success; with None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "submit", "Submit", show=False)]
    DEFAULT_CSS = """
    FormScreen { align: center middle; }
    FormScreen > VerticalScroll {
        width: 72; max-width: 100%; height: auto; max-height: 100%;
        border: thick $primary; background: $surface; padding: 0 1;
    }
    FormScreen .title { text-style: bold; margin-bottom: 1; }
    FormScreen .field-label { margin-top: 0; }
    FormScreen .error { color: $error; height: auto; display: none; }
    FormScreen Input, FormScreen Select { margin: 0 0 1 0; }
    FormScreen Horizontal { height: auto; }
    FormScreen Button { margin-right: 2; }
    """

    def __init__(self, spec: FormSpec, initial: dict[str, str] | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.initial = initial or {}

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Label(self.spec.title, classes="title")
            for field in self.spec.fields:
                yield Label(field.label, classes="field-label")
                value = self.initial.get(field.name, "")
                if field.choices:
                    start = value if value in field.choices else field.choices[0]
                    options = [(c, c) for c in field.choices]
                    yield Select(options, value=start, allow_blank=False, id=f"field-{field.name}", compact=True)
                else:
                    yield Input(value=value, placeholder=field.placeholder, id=f"field-{field.name}", compact=True)
                yield Label("", classes="error", id=f"error-{field.name}")
            yield Label("", classes="error", id="error-form")
            with Horizontal():
                yield Button(f"{self.spec.submit} (enter)", variant="primary", id="submit", compact=True)
                yield Button("Cancel (esc)", id="cancel", compact=True)

    def on_mount(self) -> None:
        """Start in the first field the caller did not fill in (else the first)."""
        empty = [f for f in self.spec.fields if not f.choices and not self.initial.get(f.name)]
        first = (empty or list(self.spec.fields))[0]
        self.query_one(f"#field-{first.name}").focus()

    def values(self) -> dict[str, str]:
        out = {}
        for field in self.spec.fields:
            widget = self.query_one(f"#field-{field.name}")
            out[field.name] = str(widget.value) if isinstance(widget, Input | Select) else ""
        return out

    def _show_error(self, field: str | None, message: str) -> None:
        label = self.query_one(f"#error-{field or 'form'}", Label)
        label.update(message)
        label.display = bool(message)

    def _clear_errors(self) -> None:
        for label in self.query(".error").results(Label):
            label.update("")
            label.display = False

    @on(Input.Changed)
    def _validate_live(self, event: Input.Changed) -> None:
        """Check the field being typed in; say nothing about fields not reached yet."""
        field = (event.input.id or "").removeprefix("field-")
        self._show_error(field, "")
        if not event.value:
            return
        try:
            self.spec.build(self.values())
        except FormError as exc:
            if exc.field == field:
                self._show_error(field, exc.message)

    @on(Input.Submitted)
    @on(Button.Pressed, "#submit")
    def action_submit(self) -> None:
        self._clear_errors()
        try:
            message = self.spec.build(self.values())
        except FormError as exc:
            self._show_error(exc.field if exc.field in {f.name for f in self.spec.fields} else None, exc.message)
            return
        self.query_one("#submit", Button).disabled = True
        self.sent = message
        self.app.send(message, self._answered)  # type: ignore[attr-defined]

    def _answered(self, result: object) -> None:
        if not self.is_attached:
            return
        self.query_one("#submit", Button).disabled = False
        if isinstance(result, BusError):
            self._show_error(None, self.app.describe_error(result))  # type: ignore[attr-defined]
            return
        self.dismiss((self.sent, result))

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
