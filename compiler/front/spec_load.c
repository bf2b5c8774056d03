/* spec_load.c: the `spec` stage as written. Reads the YAML (libyaml document
 * API) into struct moe_spec, keeping every node's line:col, rejects what YAML
 * allows but a spec must not contain, applies --set overrides in place and
 * prints the canonical text of the document (`moegen -d spec`). */
#include "moegen.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <yaml.h>

/* Deeper documents are rejected before any recursive walk sees them. */
#define MAX_DEPTH 64
/* A --set key has at most this many dotted segments. */
#define MAX_SET_SEGMENTS 32
/* Spec files are small; this only stops a mistaken path from eating memory. */
#define MAX_FILE_BYTES (64u << 20)
/* Tab complaints per file, so binary garbage does not flood the terminal. */
#define MAX_TAB_REPORTS 10

struct moe_spec {
	yaml_document_t doc;
	char *file;
	/* Nodes 1..n_file_nodes come from the file; later ones were added by
	 * --set and are located at "--set", line 1, start_mark.column + 1. */
	int n_file_nodes;
};

/* Where a text comes from, to locate its diagnostics. */
struct origin {
	const char *file;
	int is_set;    /* an override value: one line, columns offset by col0 */
	uint32_t col0; /* 0-based column of the value in the assignment */
};

static const char set_file[] = "--set";

static struct moe_loc mark_loc(const struct origin *o, yaml_mark_t m)
{
	if (o->is_set)
		return (struct moe_loc){o->file, 1, o->col0 + (uint32_t)m.index + 1};
	return (struct moe_loc){o->file, (uint32_t)m.line + 1, (uint32_t)m.column + 1};
}

/* Line and column (1-based, in bytes) of a byte offset: libyaml's reader
 * errors carry only the offset. */
static struct moe_loc offset_loc(const struct origin *o, const char *text, size_t len, size_t off)
{
	if (o->is_set)
		return (struct moe_loc){o->file, 1, o->col0 + (uint32_t)off + 1};
	uint32_t line = 1, col = 1;
	for (size_t i = 0; i < off && i < len; i++) {
		if (text[i] == '\n')
			line++, col = 1;
		else
			col++;
	}
	return (struct moe_loc){o->file, line, col};
}

static void report_parser(struct moe_diag *d, const struct origin *o, const yaml_parser_t *p,
			  const char *text, size_t len)
{
	const char *problem = p->problem ? p->problem : "malformed YAML";
	switch (p->error) {
	case YAML_MEMORY_ERROR:
		moe_diag_error(d, "out of memory while reading '%s'", o->file);
		break;
	case YAML_READER_ERROR:
		if (p->problem_value != -1)
			moe_diag_error_at(d, offset_loc(o, text, len, p->problem_offset),
					  "%s (byte 0x%02X)", problem,
					  (unsigned)p->problem_value & 0xffu);
		else
			moe_diag_error_at(d, offset_loc(o, text, len, p->problem_offset), "%s",
					  problem);
		break;
	default:
		moe_diag_error_at(d, mark_loc(o, p->problem_mark), "%s", problem);
		if (p->context)
			moe_diag_note_at(d, mark_loc(o, p->context_mark), "%s", p->context);
		break;
	}
}

/* libyaml rejects a tab in indentation with "found character that cannot
 * start any token"; say what is wrong instead. */
static int check_tabs(struct moe_diag *d, const struct origin *o, const char *t, size_t n)
{
	int bad = 0;
	uint32_t line = 1;
	for (size_t i = 0; i < n; line++) {
		size_t j = i;
		while (j < n && (t[j] == ' ' || t[j] == '\t')) {
			if (t[j] == '\t') {
				if (bad < MAX_TAB_REPORTS)
					moe_diag_error_at(
					    d,
					    (struct moe_loc){o->file, line, (uint32_t)(j - i) + 1},
					    "tab character in indentation: YAML "
					    "indents with spaces");
				bad++;
				break;
			}
			j++;
		}
		while (i < n && t[i] != '\n')
			i++;
		i++;
	}
	return bad;
}

static int report_props(struct moe_diag *d, const struct origin *o, const yaml_event_t *ev,
			const yaml_char_t *anchor, const yaml_char_t *tag)
{
	int bad = 0;
	if (anchor) {
		moe_diag_error_at(d, mark_loc(o, ev->start_mark),
				  "anchors (&%.64s) are not supported: write the value out",
				  (const char *)anchor);
		bad++;
	}
	if (tag) {
		/* Show the standard tags as written: !!str, not their URI. */
		static const char core[] = "tag:yaml.org,2002:";
		const char *t = (const char *)tag;
		int std = !strncmp(t, core, sizeof core - 1);
		moe_diag_error_at(d, mark_loc(o, ev->start_mark),
				  "tags (%s%.64s) are not supported: values are typed by their key",
				  std ? "!!" : "", std ? t + sizeof core - 1 : t);
		bad++;
	}
	return bad;
}

/* A first pass over the events, for what the loaded document no longer
 * shows: aliases (the loader turns them into shared nodes, cycles included),
 * anchors, tags, a second document, and the nesting depth. */
static int scan_events(struct moe_diag *d, const struct origin *o, const char *text, size_t len)
{
	yaml_parser_t p;
	yaml_event_t ev;
	if (!yaml_parser_initialize(&p)) {
		moe_diag_error(d, "out of memory while reading '%s'", o->file);
		return -1;
	}
	yaml_parser_set_input_string(&p, (const unsigned char *)text, len);
	int bad = 0, docs = 0, depth = 0;
	for (int done = 0; !done;) {
		if (!yaml_parser_parse(&p, &ev)) {
			report_parser(d, o, &p, text, len);
			bad++;
			break;
		}
		switch (ev.type) {
		case YAML_DOCUMENT_START_EVENT:
			if (++docs == 2) {
				moe_diag_error_at(d, mark_loc(o, ev.start_mark),
						  "a second YAML document starts here: a spec is "
						  "one document");
				bad++;
			}
			break;
		case YAML_ALIAS_EVENT:
			moe_diag_error_at(d, mark_loc(o, ev.start_mark),
					  "aliases (*%.64s) are not supported: write the value out",
					  (const char *)ev.data.alias.anchor);
			bad++;
			break;
		case YAML_SCALAR_EVENT:
			bad += report_props(d, o, &ev, ev.data.scalar.anchor, ev.data.scalar.tag);
			break;
		case YAML_SEQUENCE_START_EVENT:
		case YAML_MAPPING_START_EVENT:
			if (ev.type == YAML_SEQUENCE_START_EVENT)
				bad += report_props(d, o, &ev, ev.data.sequence_start.anchor,
						    ev.data.sequence_start.tag);
			else
				bad += report_props(d, o, &ev, ev.data.mapping_start.anchor,
						    ev.data.mapping_start.tag);
			if (++depth > MAX_DEPTH) {
				moe_diag_error_at(d, mark_loc(o, ev.start_mark),
						  "nested deeper than %d levels", MAX_DEPTH);
				bad++;
				done = 1;
			}
			break;
		case YAML_SEQUENCE_END_EVENT:
		case YAML_MAPPING_END_EVENT:
			depth--;
			break;
		case YAML_STREAM_END_EVENT:
			done = 1;
			break;
		default:
			break;
		}
		yaml_event_delete(&ev);
	}
	yaml_parser_delete(&p);
	return bad ? -1 : 0;
}

static int load_doc(yaml_document_t *doc, struct moe_diag *d, const struct origin *o,
		    const char *text, size_t len)
{
	if (scan_events(d, o, text, len) != 0)
		return -1;
	yaml_parser_t p;
	if (!yaml_parser_initialize(&p)) {
		moe_diag_error(d, "out of memory while reading '%s'", o->file);
		return -1;
	}
	yaml_parser_set_input_string(&p, (const unsigned char *)text, len);
	int ok = yaml_parser_load(&p, doc);
	if (!ok)
		report_parser(d, o, &p, text, len);
	yaml_parser_delete(&p);
	return ok ? 0 : -1;
}

static yaml_node_t *node_at(const yaml_document_t *doc, int id)
{
	if (id < 1 || id > doc->nodes.top - doc->nodes.start)
		return NULL;
	return doc->nodes.start + (id - 1);
}

static const char *node_what(const yaml_node_t *n)
{
	switch (n->type) {
	case YAML_MAPPING_NODE:
		return "a mapping";
	case YAML_SEQUENCE_NODE:
		return "a sequence";
	default:
		return "a scalar";
	}
}

static int same_scalar(const yaml_node_t *a, const char *s, size_t len)
{
	return a->type == YAML_SCALAR_NODE && a->data.scalar.length == len &&
	       memcmp(a->data.scalar.value, s, len) == 0;
}

/* A scalar key of a mapping, for the duplicate scan. */
struct key_ref {
	const unsigned char *value;
	size_t len;
	int idx; /* position of the pair in its mapping */
};

static int key_cmp(const void *pa, const void *pb)
{
	const struct key_ref *a = pa, *b = pb;
	if (a->len != b->len)
		return a->len < b->len ? -1 : 1;
	int c = memcmp(a->value, b->value, a->len);
	if (c)
		return c;
	return (a->idx > b->idx) - (a->idx < b->idx);
}

/* first[i]: the position of the earlier pair whose key equals pair i's, or
 * -1. Sorting makes this O(n log n) in the number of keys. */
static int find_duplicates(const yaml_document_t *doc, const yaml_node_t *n, int *first)
{
	int np = (int)(n->data.mapping.pairs.top - n->data.mapping.pairs.start);
	struct key_ref *keys = malloc((size_t)np * sizeof *keys + 1);
	if (!keys)
		return -1;
	int nk = 0;
	for (int i = 0; i < np; i++) {
		const yaml_node_t *k = node_at(doc, n->data.mapping.pairs.start[i].key);
		first[i] = -1;
		if (k && k->type == YAML_SCALAR_NODE)
			keys[nk++] =
			    (struct key_ref){k->data.scalar.value, k->data.scalar.length, i};
	}
	qsort(keys, (size_t)nk, sizeof *keys, key_cmp);
	for (int i = 1, g = 0; i < nk; i++) {
		if (keys[i].len == keys[g].len &&
		    !memcmp(keys[i].value, keys[g].value, keys[i].len))
			first[keys[i].idx] = keys[g].idx;
		else
			g = i;
	}
	free(keys);
	return 0;
}

/* Keys must be scalars and unique in their mapping (YAML says so, libyaml
 * does not check). Depth is bounded by scan_events. */
static int check_tree(const yaml_document_t *doc, int id, struct moe_diag *d,
		      const struct origin *o)
{
	const yaml_node_t *n = node_at(doc, id);
	int bad = 0;
	if (!n)
		return 0;
	if (n->type == YAML_SEQUENCE_NODE) {
		for (yaml_node_item_t *it = n->data.sequence.items.start;
		     it < n->data.sequence.items.top; it++)
			bad += check_tree(doc, *it, d, o);
		return bad;
	}
	if (n->type != YAML_MAPPING_NODE)
		return 0;
	yaml_node_pair_t *pairs = n->data.mapping.pairs.start;
	int np = (int)(n->data.mapping.pairs.top - pairs);
	int *first = malloc((size_t)np * sizeof *first + 1);
	if (!first || find_duplicates(doc, n, first) != 0) {
		free(first);
		moe_diag_error(d, "out of memory while reading '%s'", o->file);
		return bad + 1;
	}
	for (int i = 0; i < np; i++) {
		const yaml_node_t *k = node_at(doc, pairs[i].key);
		if (k && k->type != YAML_SCALAR_NODE) {
			moe_diag_error_at(d, mark_loc(o, k->start_mark),
					  "a key must be a name, got %s", node_what(k));
			bad++;
		} else if (k && first[i] >= 0) {
			const yaml_node_t *k0 = node_at(doc, pairs[first[i]].key);
			moe_diag_error_at(d, mark_loc(o, k->start_mark), "duplicate key '%.100s'",
					  (const char *)k->data.scalar.value);
			moe_diag_note_at(d, mark_loc(o, k0->start_mark),
					 "'%.100s' first given here",
					 (const char *)k0->data.scalar.value);
			bad++;
		}
		bad += check_tree(doc, pairs[i].value, d, o);
	}
	free(first);
	return bad;
}

struct moe_spec *moe_spec_load_string(const char *name, const char *text, size_t len,
				      struct moe_diag *d)
{
	struct origin o = {name ? name : "<string>", 0, 0};
	if (!text)
		len = 0, text = "";
	if (check_tabs(d, &o, text, len))
		return NULL;
	struct moe_spec *s = calloc(1, sizeof *s);
	if (!s) {
		moe_diag_error(d, "out of memory while reading '%s'", o.file);
		return NULL;
	}
	if (load_doc(&s->doc, d, &o, text, len) != 0) {
		free(s);
		return NULL;
	}
	int bad = 0;
	yaml_node_t *root = yaml_document_get_root_node(&s->doc);
	if (!root || (root->type == YAML_SCALAR_NODE && root->data.scalar.length == 0 &&
		      root->data.scalar.style == YAML_PLAIN_SCALAR_STYLE)) {
		moe_diag_error_at(d, (struct moe_loc){o.file, 1, 1},
				  "empty spec: expected a mapping such as 'moegen: 1'");
		bad = 1;
	} else if (root->type != YAML_MAPPING_NODE) {
		moe_diag_error_at(d, mark_loc(&o, root->start_mark),
				  "a spec must be a mapping of keys to values, got %s",
				  node_what(root));
		bad = 1;
	} else {
		bad = check_tree(&s->doc, 1, d, &o);
	}
	s->file = strdup(o.file);
	if (!s->file && !bad) {
		moe_diag_error(d, "out of memory while reading '%s'", o.file);
		bad = 1;
	}
	if (bad) {
		moe_spec_free(s);
		return NULL;
	}
	s->n_file_nodes = (int)(s->doc.nodes.top - s->doc.nodes.start);
	return s;
}

int moe_spec_read(const char *path, char **text, size_t *len_out, struct moe_diag *d)
{
	*text = NULL, *len_out = 0;
	int fd = moe_input_open(path, d);
	if (fd < 0)
		return -1;
	FILE *f = fdopen(fd, "rb");
	if (!f) {
		moe_diag_error(d, "cannot read '%s': %s", path, strerror(errno));
		close(fd);
		return -1;
	}
	size_t cap = 4096, len = 0;
	char *buf = malloc(cap);
	int err = 0;
	while (buf) {
		if (len == cap) {
			if (cap >= MAX_FILE_BYTES) {
				err = EFBIG;
				break;
			}
			char *nb = realloc(buf, cap * 2);
			if (!nb) {
				err = ENOMEM;
				break;
			}
			buf = nb, cap *= 2;
		}
		size_t n = fread(buf + len, 1, cap - len, f);
		len += n;
		if (n == 0) {
			if (ferror(f))
				err = errno ? errno : EIO;
			break;
		}
	}
	if (!buf)
		err = ENOMEM;
	fclose(f);
	if (err) {
		moe_diag_error(d, "cannot read '%s': %s", path, strerror(err));
		free(buf);
		return -1;
	}
	*text = buf, *len_out = len;
	return 0;
}

struct moe_spec *moe_spec_load(const char *path, struct moe_diag *d)
{
	char *buf;
	size_t len;
	if (moe_spec_read(path, &buf, &len, d) != 0)
		return NULL;
	struct moe_spec *s = moe_spec_load_string(path, buf, len, d);
	free(buf);
	return s;
}

void moe_spec_free(struct moe_spec *s)
{
	if (!s)
		return;
	yaml_document_delete(&s->doc);
	free(s->file);
	free(s);
}

/* Accessors for spec_check.c. */

const struct yaml_node_s *moe_spec_root(const struct moe_spec *s)
{
	return node_at(&s->doc, 1);
}

const struct yaml_node_s *moe_spec_node(const struct moe_spec *s, int id)
{
	return node_at(&s->doc, id);
}

struct moe_loc moe_spec_loc(const struct moe_spec *s, const struct yaml_node_s *n)
{
	if (!n)
		return (struct moe_loc){s->file, 1, 1};
	int id = (int)(n - s->doc.nodes.start) + 1;
	if (id > s->n_file_nodes)
		return (struct moe_loc){set_file, 1, (uint32_t)n->start_mark.column + 1};
	return (struct moe_loc){s->file, (uint32_t)n->start_mark.line + 1,
				(uint32_t)n->start_mark.column + 1};
}

/* --set ------------------------------------------------------------------ */

static void set_mark(yaml_document_t *doc, int id, uint32_t col0)
{
	yaml_node_t *n = node_at(doc, id);
	yaml_mark_t m = {col0, 0, col0};
	n->start_mark = n->end_mark = m;
}

/* Copy node `id` of `src` into `dst`; 0 when out of memory. */
static int copy_node(yaml_document_t *dst, const yaml_document_t *src, int id, uint32_t col0)
{
	const yaml_node_t *n = node_at(src, id);
	int out = 0;
	switch (n->type) {
	case YAML_SCALAR_NODE:
		out = yaml_document_add_scalar(dst, n->tag, n->data.scalar.value,
					       (int)n->data.scalar.length, n->data.scalar.style);
		break;
	case YAML_SEQUENCE_NODE:
		out = yaml_document_add_sequence(dst, n->tag, YAML_BLOCK_SEQUENCE_STYLE);
		for (yaml_node_item_t *it = n->data.sequence.items.start;
		     out && it < n->data.sequence.items.top; it++) {
			int c = copy_node(dst, src, *it, col0);
			if (!c || !yaml_document_append_sequence_item(dst, out, c))
				return 0;
		}
		break;
	case YAML_MAPPING_NODE:
		out = yaml_document_add_mapping(dst, n->tag, YAML_BLOCK_MAPPING_STYLE);
		for (yaml_node_pair_t *p = n->data.mapping.pairs.start;
		     out && p < n->data.mapping.pairs.top; p++) {
			int k = copy_node(dst, src, p->key, col0);
			int v = k ? copy_node(dst, src, p->value, col0) : 0;
			if (!v || !yaml_document_append_mapping_pair(dst, out, k, v))
				return 0;
		}
		break;
	default:
		return 0;
	}
	if (out)
		set_mark(dst, out, col0 + (uint32_t)n->start_mark.index);
	return out;
}

/* The pair of mapping `map` whose key is s[0..len), or NULL. */
static yaml_node_pair_t *find_pair(const yaml_document_t *doc, int map, const char *s, size_t len)
{
	const yaml_node_t *m = node_at(doc, map);
	for (yaml_node_pair_t *p = m->data.mapping.pairs.start; p < m->data.mapping.pairs.top;
	     p++) {
		const yaml_node_t *k = node_at(doc, p->key);
		if (k && same_scalar(k, s, len))
			return p;
	}
	return NULL;
}

static int add_key(yaml_document_t *doc, const char *s, size_t len, uint32_t col0)
{
	int k = yaml_document_add_scalar(doc, NULL, (yaml_char_t *)s, (int)len,
					 YAML_PLAIN_SCALAR_STYLE);
	if (k)
		set_mark(doc, k, col0);
	return k;
}

int moe_spec_set(struct moe_spec *s, const char *a, struct moe_diag *d)
{
	struct moe_loc at = {set_file, 1, 1};
	if (!s || !a) {
		moe_diag_error(d, "--set: nothing to set");
		return -1;
	}
	const char *eq = strchr(a, '=');
	if (!eq) {
		at.col = (uint32_t)strnlen(a, 1u << 20) + 1;
		moe_diag_error_at(d, at, "expected KEY=VALUE, got '%.200s'", a);
		return -1;
	}
	if (eq == a) {
		moe_diag_error_at(d, at, "empty key before '=' in '%.200s'", a);
		return -1;
	}
	/* Split the key on dots; every segment must be non-empty. */
	const char *seg[MAX_SET_SEGMENTS];
	size_t seg_len[MAX_SET_SEGMENTS];
	int n_seg = 0;
	for (const char *p = a;;) {
		const char *e = p;
		while (e < eq && *e != '.')
			e++;
		if (e == p) {
			at.col = (uint32_t)(p - a) + 1;
			moe_diag_error_at(d, at, "empty key segment in '%.*s'", (int)(eq - a), a);
			return -1;
		}
		if (n_seg == MAX_SET_SEGMENTS) {
			at.col = (uint32_t)(p - a) + 1;
			moe_diag_error_at(d, at, "key has more than %d segments", MAX_SET_SEGMENTS);
			return -1;
		}
		seg[n_seg] = p, seg_len[n_seg++] = (size_t)(e - p);
		if (e == eq)
			break;
		p = e + 1;
	}
	const char *val = eq + 1;
	size_t val_len = strlen(val);
	uint32_t val_col0 = (uint32_t)(val - a);
	if (val_len == 0) {
		at.col = val_col0 + 1;
		moe_diag_error_at(d, at,
				  "missing value after '=' in '%.200s' (write '' for an "
				  "empty string)",
				  a);
		return -1;
	}

	struct origin o = {set_file, 1, val_col0};
	yaml_document_t tmp;
	if (load_doc(&tmp, d, &o, val, val_len) != 0)
		return -1;
	int rc = -1;
	if (!yaml_document_get_root_node(&tmp)) {
		at.col = val_col0 + 1;
		moe_diag_error_at(d, at, "missing value after '=' in '%.200s'", a);
		goto out;
	}
	if (check_tree(&tmp, 1, d, &o) != 0)
		goto out;

	int cur = 1; /* the root mapping */
	for (int i = 0; i < n_seg; i++) {
		uint32_t col0 = (uint32_t)(seg[i] - a);
		yaml_node_pair_t *p = find_pair(&s->doc, cur, seg[i], seg_len[i]);
		if (i == n_seg - 1) {
			int v = copy_node(&s->doc, &tmp, 1, val_col0);
			if (!v)
				goto oom;
			/* Adding nodes moves them: look the pair up again. */
			p = find_pair(&s->doc, cur, seg[i], seg_len[i]);
			if (p) {
				p->value = v;
			} else {
				int k = add_key(&s->doc, seg[i], seg_len[i], col0);
				if (!k || !yaml_document_append_mapping_pair(&s->doc, cur, k, v))
					goto oom;
			}
			break;
		}
		if (p) {
			const yaml_node_t *v = node_at(&s->doc, p->value);
			if (v->type != YAML_MAPPING_NODE) {
				at.col = col0 + 1;
				moe_diag_error_at(d, at, "cannot set %.*s: %.*s is %s",
						  (int)(eq - a), a, (int)(seg[i] + seg_len[i] - a),
						  a, node_what(v));
				goto out;
			}
			cur = p->value;
			continue;
		}
		int m = yaml_document_add_mapping(&s->doc, NULL, YAML_BLOCK_MAPPING_STYLE);
		int k = m ? add_key(&s->doc, seg[i], seg_len[i], col0) : 0;
		if (!k || !yaml_document_append_mapping_pair(&s->doc, cur, k, m))
			goto oom;
		set_mark(&s->doc, m, col0);
		cur = m;
	}
	rc = 0;
	goto out;
oom:
	moe_diag_error(d, "out of memory applying --set '%.200s'", a);
out:
	yaml_document_delete(&tmp);
	return rc;
}

/* -d spec ------------------------------------------------------------------ */

/* Plain scalars are printed as read: a plain scalar valid anywhere in the
 * input is valid in block context. Everything else is double-quoted, so the
 * dump reads back as the same document. */
static void dump_scalar(const yaml_node_t *n, FILE *out)
{
	const unsigned char *v = n->data.scalar.value;
	size_t len = n->data.scalar.length;
	if (n->data.scalar.style == YAML_PLAIN_SCALAR_STYLE) {
		fwrite(v, 1, len, out);
		return;
	}
	fputc('"', out);
	for (size_t i = 0; i < len; i++) {
		unsigned c = v[i];
		if (c == '"' || c == '\\')
			fprintf(out, "\\%c", c);
		else if (c == '\n')
			fputs("\\n", out);
		else if (c == '\t')
			fputs("\\t", out);
		else if (c < 0x20 || c == 0x7f)
			fprintf(out, "\\x%02x", c);
		else
			fputc((int)c, out);
	}
	fputc('"', out);
}

static int is_empty_plain(const yaml_node_t *n)
{
	return n->type == YAML_SCALAR_NODE && n->data.scalar.length == 0 &&
	       n->data.scalar.style == YAML_PLAIN_SCALAR_STYLE;
}

static void dump_node(const yaml_document_t *doc, const yaml_node_t *n, int indent, FILE *out);

/* The text after "key:" or "-": a scalar on the same line, an empty
 * collection as {} or [], else the collection on the next lines. */
static void dump_value(const yaml_document_t *doc, const yaml_node_t *v, int indent, FILE *out)
{
	if (v->type == YAML_SCALAR_NODE) {
		if (!is_empty_plain(v)) {
			fputc(' ', out);
			dump_scalar(v, out);
		}
		fputc('\n', out);
	} else if (v->type == YAML_MAPPING_NODE &&
		   v->data.mapping.pairs.start == v->data.mapping.pairs.top) {
		fputs(" {}\n", out);
	} else if (v->type == YAML_SEQUENCE_NODE &&
		   v->data.sequence.items.start == v->data.sequence.items.top) {
		fputs(" []\n", out);
	} else {
		fputc('\n', out);
		dump_node(doc, v, indent + 2, out);
	}
}

static void dump_node(const yaml_document_t *doc, const yaml_node_t *n, int indent, FILE *out)
{
	if (n->type == YAML_MAPPING_NODE) {
		for (yaml_node_pair_t *p = n->data.mapping.pairs.start;
		     p < n->data.mapping.pairs.top; p++) {
			/* The first key of a mapping in a sequence follows its "- ". */
			if (indent >= 0)
				fprintf(out, "%*s", indent, "");
			else
				indent = -indent;
			dump_scalar(node_at(doc, p->key), out);
			fputc(':', out);
			dump_value(doc, node_at(doc, p->value), indent, out);
		}
	} else if (n->type == YAML_SEQUENCE_NODE) {
		for (yaml_node_item_t *it = n->data.sequence.items.start;
		     it < n->data.sequence.items.top; it++) {
			const yaml_node_t *v = node_at(doc, *it);
			fprintf(out, "%*s-", indent, "");
			if (v->type == YAML_MAPPING_NODE &&
			    v->data.mapping.pairs.start != v->data.mapping.pairs.top) {
				fputc(' ', out);
				dump_node(doc, v, -(indent + 2), out);
			} else {
				dump_value(doc, v, indent, out);
			}
		}
	} else {
		fprintf(out, "%*s", indent, "");
		dump_scalar(n, out);
		fputc('\n', out);
	}
}

void moe_spec_dump(const struct moe_spec *s, FILE *out)
{
	const yaml_node_t *root = node_at(&s->doc, 1);
	if (root)
		dump_node(&s->doc, root, 0, out);
}
