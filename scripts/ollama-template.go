// Renders an Ollama TEMPLATE with Go's text/template, the engine Ollama runs, for the checks of
// scripts/check-ollama-modelfile.py. Reads JSON on stdin:
//
//	{"template": "...", "system": "...", "conversations": [[{"role": "user", "content": "..."}], ...]}
//
// and prints a JSON array with one rendering per conversation. As Ollama's chat handler does, a
// conversation without a system message gets the Modelfile's SYSTEM as its first message.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Input struct {
	Template      string      `json:"template"`
	System        string      `json:"system"`
	Conversations [][]Message `json:"conversations"`
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("modelfile").Parse(in.Template))
	out := []string{}
	for _, msgs := range in.Conversations {
		if in.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
			msgs = append([]Message{{Role: "system", Content: in.System}}, msgs...)
		}
		var b strings.Builder
		if err := t.Execute(&b, map[string]any{"Messages": msgs}); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
