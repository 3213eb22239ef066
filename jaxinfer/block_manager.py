"""Page allocation: a free list with reference counts, and an LRU prefix cache of full pages.

A full page is identified by the hash of its tokens chained with the hash of the page before it,
so equal hashes mean equal prefixes. Full pages are always published this way; a page whose last
user leaves keeps its content and its hash, and when free pages run out the least recently released
cached page is reused. With prefix caching on, any request with the same prefix takes such pages
instead of recomputing them; with it off, only the completions of one ``n > 1`` request share
their prompt's pages.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Sequence

from jaxinfer.kv_cache import TRASH_PAGE


class NoFreePages(RuntimeError):
    pass


def chain_hash(parent: int | None, tokens: Sequence[int]) -> int:
    return hash((parent, tuple(tokens)))


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = False):
        if num_pages < 2:
            raise ValueError("the cache needs at least 2 pages (one is the trash page)")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: deque[int] = deque(p for p in range(num_pages) if p != TRASH_PAGE)
        self._refs = [0] * num_pages
        self._hash_of: dict[int, int] = {}
        self._page_of: dict[int, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; LRU first

    @property
    def usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        """Pages an allocation can take now (free, or cached and unreferenced)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_pages(self) -> int:
        return self.usable_pages - self.num_free_pages

    @property
    def num_cached_pages(self) -> int:
        return len(self._hash_of)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free_pages:
            raise NoFreePages(f"need {n} pages, {self.num_free_pages} free")
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.popleft()
            else:
                page, _ = self._evictable.popitem(last=False)
                del self._page_of[self._hash_of.pop(page)]
            self._refs[page] = 1
            pages.append(page)
        return pages

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page (in sequence order: later pages are evicted first)."""
        for page in reversed(pages):
            self._refs[page] -= 1
            if self._refs[page] < 0:
                raise AssertionError(f"page {page} released more often than taken")
            if self._refs[page] == 0:
                if page in self._hash_of:
                    self._evictable[page] = None
                else:
                    self._free.append(page)

    def match_prefix(self, token_ids: Sequence[int], force: bool = False) -> tuple[list[int], list[int]]:
        """Cached pages holding the longest known prefix of ``token_ids`` (referenced for the caller)
        and their hashes; only with prefix caching on, unless ``force``. At least one token is
        always left to compute, for the next-token logits."""
        if not (self.enable_prefix_caching or force):
            return [], []
        pages, hashes, parent = [], [], None
        for start in range(0, len(token_ids) - 1 - self.page_size + 1, self.page_size):
            h = chain_hash(parent, token_ids[start : start + self.page_size])
            page = self._page_of.get(h)
            if page is None:
                break
            if self._refs[page] == 0:
                del self._evictable[page]
            self._refs[page] += 1
            pages.append(page)
            hashes.append(h)
            parent = h
        return pages, hashes

    def register_full_pages(self, token_ids: Sequence[int], pages: Sequence[int], hashes: list[int], num_computed: int) -> None:
        """Publish a sequence's pages that are now full and computed; extends ``hashes`` in place."""
        while (len(hashes) + 1) * self.page_size <= num_computed:
            i = len(hashes)
            h = chain_hash(hashes[-1] if hashes else None, token_ids[i * self.page_size : (i + 1) * self.page_size])
            hashes.append(h)
            page = pages[i]
            if h not in self._page_of and page not in self._hash_of:
                self._page_of[h] = page
                self._hash_of[page] = h

    def check_no_leaks(self) -> None:
        """Every page is free or only held by the prefix cache (an invariant for tests)."""
        held = [p for p in range(self.num_pages) if p != TRASH_PAGE and self._refs[p]]
        if held:
            raise AssertionError(f"pages still referenced: {held}")
        if self.num_free_pages != self.usable_pages:
            raise AssertionError(f"{self.usable_pages - self.num_free_pages} pages neither free nor cached")
